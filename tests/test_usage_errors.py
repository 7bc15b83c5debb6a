"""Plans that cannot run here are usage errors (exit 4) naming the option; nothing is written.

In-process pytester runs: the error ends pytest in pytest_configure, before any rank starts.
The GPU count is faked (the plan's count, narrowed by CUDA_VISIBLE_DEVICES) so the checks
behave the same on a machine with GPUs and on one without.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pytest_allreduce.plan as plan_module
from pytest_allreduce.options import Options
from pytest_allreduce.plan import Plan, PlanError, check_capacity, plan_warnings
from pytest_allreduce.plugin import allreduce_asked_for
from pytest_allreduce.registry import BackendRegistry

TEST_CASE_PY = """
def test_case(allreduce_case):
    pass
"""


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(plan_module, "visible_gpu_count", lambda: count)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(count))))


@pytest.mark.parametrize(
    ("gpus", "args", "expected"),
    [
        pytest.param(
            0,
            ["--allreduce-device=cuda"],
            ["--allreduce-device=cuda: no GPU is visible", "use --allreduce-device=cpu or auto"],
            id="cuda-without-gpu",
        ),
        pytest.param(
            0,
            ["--allreduce-backends=nccl"],
            ["--allreduce-backends=nccl: only GPU backends", "runs on the CPU (0 GPUs visible)"],
            id="gpu-backends-on-cpu",
        ),
        pytest.param(
            0,
            ["--allreduce-backends=pynccl,torch_symm_mem"],
            [
                "--allreduce-backends=pynccl,torch_symm_mem_one_shot,torch_symm_mem_two_shot,"
                "torch_symm_mem_multimem: only GPU backends",
                "add a CPU backend (gloo, cpu_shm)",
            ],
            id="gpu-variants-on-cpu",
        ),
        pytest.param(
            2,
            ["--allreduce-backends=gloo,cpu_shm"],
            ["--allreduce-backends=gloo,cpu_shm: only CPU backends", "--allreduce-device=cpu"],
            id="cpu-backends-on-cuda",
        ),
        pytest.param(
            0,
            ["--allreduce-world-sizes=1,2"],
            ["--allreduce-world-sizes: world size 1 is not a process group"],
            id="world-size-1",
        ),
        pytest.param(
            2,
            ["--allreduce-world-sizes=2,4"],
            ["--allreduce-world-sizes=2,4: world size 4 needs 4 GPUs; 2 visible"],
            id="world-size-above-gpus",
        ),
    ],
)
def test_plan_that_cannot_run_here_is_a_usage_error_and_writes_nothing(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    gpus: int,
    args: list[str],
    expected: list[str],
) -> None:
    _fake_gpus(monkeypatch, gpus)
    pytester.makepyfile(test_case=TEST_CASE_PY)
    before = _files(pytester.path)
    result = pytester.runpytest(
        *args, "--allreduce-output-dir=out", "-p", "no:cacheprovider", "test_case.py"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    error = result.stderr.str()
    assert "INTERNALERROR" not in error + result.stdout.str()
    for text in expected:
        assert text in error, f"{text!r} not in the error:\n{error}"
    assert _files(pytester.path) == before
    assert "test_case" not in result.stdout.str()


def test_world_size_above_gpus_is_fine_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchrun job brings its own ranks (across nodes, GPUs of other hosts count)."""
    plan = _plan(monkeypatch, gpus=2, world_sizes=(8,), backends=("nccl",))
    check_capacity(plan, torchrun=True)
    with pytest.raises(PlanError, match="world size 8 needs 8 GPUs; 2 visible"):
        check_capacity(plan, torchrun=False)


def test_xdist_share_names_the_workers_and_what_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(monkeypatch, gpus=8, world_sizes=(2, 4), backends=("nccl",))
    check_capacity(plan, torchrun=False, workers=2)
    with pytest.raises(PlanError) as refused:
        check_capacity(plan, torchrun=False, workers=4)
    assert str(refused.value) == (
        "--allreduce-world-sizes=2,4: -n 4 leaves each xdist worker 2 of the 8 visible GPUs, "
        "and world size 4 needs 4; use -n 2 or smaller world sizes"
    )


def test_a_session_that_did_not_ask_for_allreduce_is_left_alone(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another project's tests, in an environment where the plugin is installed, on a
    one-GPU machine: the default world size (2) does not fit, and that is not their problem."""
    _fake_gpus(monkeypatch, 1)
    pytester.makepyfile(test_other="def test_other():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "test_other.py")
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    assert "= allreduce =" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "ini", "asked"),
    [
        pytest.param(["test_other.py"], None, False, id="other-tests"),
        pytest.param(["--allreduce-world-sizes=2", "test_other.py"], None, True, id="option"),
        pytest.param(["test_other.py"], "allreduce_hidden_sizes = 64", True, id="ini-key"),
        pytest.param(["--pyargs", "pytest_allreduce.suites"], None, True, id="pyargs-suites"),
        pytest.param(
            ["--pyargs", "pytest_allreduce.suites.test_latency"], None, True, id="pyargs-module"
        ),
        pytest.param(["SUITES/test_numerics.py::test_numerics"], None, True, id="suites-path"),
    ],
)
def test_which_sessions_asked_for_allreduce(
    pytester: pytest.Pytester, args: list[str], ini: str | None, asked: bool
) -> None:
    import pytest_allreduce.suites

    if ini is not None:
        pytester.makeini(f"[pytest]\n{ini}\n")
    suites = str(Path(pytest_allreduce.suites.__file__).parent)
    config = pytester.parseconfig(*[a.replace("SUITES", suites) for a in args])
    assert allreduce_asked_for(config) is asked


def test_ranks_above_cpu_cores_are_a_warning_in_the_summary(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(plan_module, "usable_cpus", lambda: 1)
    pytester.makepyfile(test_case=TEST_CASE_PY)
    result = pytester.runpytest(
        "--allreduce-world-sizes=2", "--collect-only", "-p", "no:cacheprovider", "test_case.py"
    )
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*= allreduce =*",
            "warning: 2 ranks share 1 CPU cores: ranks wait for a core, so latencies time the "
            "scheduler as much as the backend",
        ]
    )


def test_no_warning_while_ranks_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(monkeypatch, gpus=0, world_sizes=(2, 4), backends=("gloo",))
    assert plan_warnings(plan, cpus=4) == []
    assert plan_warnings(plan, workers=2, cpus=4) == [
        "8 ranks (2 xdist workers x world size 4) share 4 CPU cores: ranks wait for a core, "
        "so latencies time the scheduler as much as the backend"
    ]


def _plan(
    monkeypatch: pytest.MonkeyPatch,
    *,
    gpus: int,
    world_sizes: tuple[int, ...],
    backends: tuple[str, ...],
) -> Plan:
    _fake_gpus(monkeypatch, gpus)
    registry = BackendRegistry()
    registry.load_builtins()
    options = Options(
        backends=backends,
        device="auto",
        world_sizes=world_sizes,
        hidden_sizes=(64,),
        batch_sizes=(1,),
        dtypes=("bfloat16",),
        output_dir=Path("unused"),
        timeout_s=10,
        baseline=None,
        save_baseline=None,
    )
    plan = Plan.build(options, registry)
    assert plan.gpu_count == gpus, os.environ.get("CUDA_VISIBLE_DEVICES")
    return plan
