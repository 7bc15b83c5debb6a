"""The plugin end to end, through pytester, on the CPU.

Usage errors are checked in-process (they end pytest before any rank starts, so they are
cheap); every run that starts ranks goes through a subprocess, so that spawned ranks and
sys.modules start clean.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from pytest_allreduce.config import load_config

CONFIG = Path("tp2", "allreduce_config_hidden=4096,device=cpu.json")
EVIDENCE = Path("tp2", "allreduce_evidence_hidden=4096,device=cpu.json")
REPORT = Path("tp2", "allreduce_report_hidden=4096,dtype=bfloat16,device=cpu.md")
PLOT = Path("tp2", "allreduce_latency_hidden=4096,dtype=bfloat16,device=cpu.png")
CONFIG_ENTRY_KEYS = {"backend_type", "use_residual_rmsnorm_fusion", "backend_name"}

# A plugin module (`-p cuda_watch`) that records every attempt of the pytest process to
# initialise CUDA, and the state at the very end; written as JSON beside the run.
CUDA_WATCH_PY = """
import json

import pytest
import torch

attempts = []
_lazy_init, _init = torch.cuda._lazy_init, torch.cuda.init


def _watched_lazy_init(*args, **kwargs):
    attempts.append("torch.cuda._lazy_init")
    return _lazy_init(*args, **kwargs)


def _watched_init(*args, **kwargs):
    attempts.append("torch.cuda.init")
    return _init(*args, **kwargs)


torch.cuda._lazy_init = _watched_lazy_init
torch.cuda.init = _watched_init


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    state = {"initialized": torch.cuda.is_initialized(), "attempts": attempts}
    path = config.invocation_params.dir / "cuda_watch.json"
    path.write_text(json.dumps(state))
"""


def _files(root: Path) -> dict[str, os.stat_result]:
    """Every file under root (relative path -> stat)."""
    return {str(p.relative_to(root)): p.stat() for p in root.rglob("*") if p.is_file()}


def _temp_leftovers(root: Path) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.startswith(".") or p.name.endswith((".tmp", ".part", "~"))
    ]


def _values_of(key: str, obj: object) -> list[object]:
    """Every value stored under `key` anywhere in parsed JSON."""
    found: list[object] = []
    if isinstance(obj, dict):
        for k, item in obj.items():
            if k == key:
                found.append(item)
            found += _values_of(key, item)
    elif isinstance(obj, list):
        for item in obj:
            found += _values_of(key, item)
    return found


def _batch_sizes_collected(result: pytest.RunResult) -> list[int]:
    """Batch sizes of the collected `test_case[...-bsN]` items."""
    return sorted(
        int(m)
        for m in re.findall(r"test_case\[gloo-tp2-h4096-bfloat16-bs(\d+)\]", result.stdout.str())
    )


def _check_config(path: Path) -> dict[str, dict[str, object]]:
    """The server config's format, checked key by key; returns it parsed."""
    pairs = json.loads(path.read_text(), object_pairs_hook=lambda kv: kv)
    assert isinstance(pairs, list) and pairs, "the config is not a non-empty JSON object"
    keys = [k for k, _ in pairs]
    for key in keys:
        assert re.fullmatch(r"[1-9][0-9]*", key), f"key {key!r} is not a decimal batch size"
    assert [int(k) for k in keys] == sorted({int(k) for k in keys}), keys
    config = json.loads(path.read_text())
    for key, entry in config.items():
        assert set(entry) == CONFIG_ENTRY_KEYS, (key, entry)
        assert entry["backend_type"] in {"gloo", "cpu_shm"}, (key, entry)
        assert entry["backend_name"] in {"gloo", "cpu_shm"}, (key, entry)
        assert entry["use_residual_rmsnorm_fusion"] is False, (key, entry)
    loaded = load_config(path)
    assert sorted(loaded) == sorted(int(k) for k in keys)
    return config


# ---- 1. options ------------------------------------------------------------------------------

TEST_CASE_PY = """
def test_case(allreduce_case):
    pass
"""

BAD_VALUES = [
    # (command-line args, ini text, what the error must say: option, then what is allowed)
    pytest.param(
        ["--allreduce-backends=gloo,nosuch"],
        None,
        ["--allreduce-backends", "unknown backend(s): nosuch", "allowed: all,", "gloo", "nccl"],
        id="backend",
    ),
    pytest.param(
        ["--allreduce-device=tpu"],
        None,
        ["--allreduce-device='tpu'", "allowed values: auto, cuda, cpu"],
        id="device",
    ),
    pytest.param(
        ["--allreduce-batch-sizes=1,abc"],
        None,
        ["--allreduce-batch-sizes='1,abc'", "'abc' is not an integer"],
        id="batch-not-integer",
    ),
    pytest.param(
        ["--allreduce-batch-sizes=0"],
        None,
        ["--allreduce-batch-sizes='0'", "positive integer"],
        id="batch-zero",
    ),
    pytest.param(
        ["--allreduce-batch-sizes=8,-4"],
        None,
        ["--allreduce-batch-sizes='8,-4'", "positive integer"],
        id="batch-negative",
    ),
    pytest.param(
        ["--allreduce-batch-sizes=64:32:8"],
        None,
        # The design: the error names what is allowed, here the range form a:b[:step].
        ["--allreduce-batch-sizes='64:32:8'", "ends before it starts", "a:b"],
        id="batch-backwards-range",
    ),
    pytest.param(
        ["--allreduce-batch-sizes=1:2:3:4"],
        None,
        ["--allreduce-batch-sizes='1:2:3:4'", "a:b or a:b:step"],
        id="batch-bad-range",
    ),
    pytest.param(
        ["--allreduce-world-sizes=0"],
        None,
        ["--allreduce-world-sizes='0'", "positive integer"],
        id="world-size-zero",
    ),
    pytest.param(
        ["--allreduce-dtypes=bfloat16,float8"],
        None,
        ["--allreduce-dtypes='bfloat16,float8'", "allowed: float32, float16, bfloat16"],
        id="dtype",
    ),
    pytest.param(
        ["--allreduce-timeout=0"],
        None,
        ["--allreduce-timeout='0'", "positive number of seconds"],
        id="timeout-zero",
    ),
    pytest.param(
        ["--allreduce-timeout=-5"],
        None,
        ["--allreduce-timeout='-5'", "positive number of seconds"],
        id="timeout-negative",
    ),
    pytest.param(
        ["--allreduce-timeout=soon"],
        None,
        ["--allreduce-timeout='soon'", "number of seconds"],
        id="timeout-not-a-number",
    ),
    pytest.param(
        ["--allreduce-baseline=no-such-baseline.json"],
        None,
        ["--allreduce-baseline='no-such-baseline.json'", "no such baseline file"],
        id="baseline-missing",
    ),
    pytest.param(
        [],
        "allreduce_batch_sizes = 0",
        ["ini key allreduce_batch_sizes='0'", "positive integer"],
        id="ini-batch-zero",
    ),
    pytest.param(
        [],
        "allreduce_device = gpu",
        ["ini key allreduce_device='gpu'", "allowed values: auto, cuda, cpu"],
        id="ini-device",
    ),
]


@pytest.mark.parametrize(("args", "ini", "expected"), BAD_VALUES)
def test_bad_option_value_is_a_usage_error_and_writes_nothing(
    pytester: pytest.Pytester, args: list[str], ini: str | None, expected: list[str]
) -> None:
    if ini is not None:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_case=TEST_CASE_PY)
    before = _files(pytester.path)
    result = pytester.runpytest(
        *args, "--allreduce-output-dir=out", "-p", "no:cacheprovider", "test_case.py"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    error = result.stderr.str()
    assert "ERROR:" in error
    for text in expected:
        assert text in error, f"{text!r} not in the error:\n{error}"
    assert not (pytester.path / "out").exists()
    assert not (pytester.path / "allreduce-results").exists()
    assert _files(pytester.path).keys() == before.keys()
    assert "test_case" not in result.stdout.str()  # nothing was collected


@pytest.mark.parametrize(
    ("ini", "flag", "sizes"),
    [
        pytest.param(None, "1,2,32:64:8", [1, 2, 32, 40, 48, 56, 64], id="flag-with-range"),
        pytest.param(None, "32:60:8,4:6", [4, 5, 6, 32, 40, 48, 56], id="range-end-not-hit"),
        pytest.param("3, 5", None, [3, 5], id="ini-without-flag"),
        pytest.param("3,5", "7", [7], id="flag-beats-ini"),
        pytest.param("0", "7", [7], id="flag-beats-bad-ini"),
    ],
)
def test_batch_sizes_from_flag_and_ini(
    pytester: pytest.Pytester, ini: str | None, flag: str | None, sizes: list[int]
) -> None:
    if ini is not None:
        pytester.makeini(f"[pytest]\nallreduce_batch_sizes = {ini}\n")
    pytester.makepyfile(test_case=TEST_CASE_PY)
    args = ["--allreduce-backends=gloo", "--allreduce-device=cpu", "--collect-only", "-q"]
    # No tail past the planned sizes: only the planned sizes are collected.
    args.append(f"--allreduce-max-tokens={max(sizes)}")
    if flag is not None:
        args.append(f"--allreduce-batch-sizes={flag}")
    result = pytester.runpytest(*args, "-p", "no:cacheprovider", "test_case.py")
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    assert _batch_sizes_collected(result) == sizes


# ---- 5., 8. the artifacts of a real CPU run ----------------------------------------------------


def test_real_suites_write_the_config_evidence_report_and_plot(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(cuda_watch=CUDA_WATCH_PY)
    result = pytester.runpytest_subprocess(
        "-p",
        "cuda_watch",
        "-p",
        "no:cacheprovider",
        "-rs",
        "--pyargs",
        "pytest_allreduce.suites",
        "--allreduce-batch-sizes=1,8,64",
        "--allreduce-max-tokens=64",
        "--allreduce-max-tokens=64",
        "--allreduce-output-dir=out",
        "--allreduce-timeout=60",
        timeout=300,
    )
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) > 0 and "failed" not in outcomes

    out = pytester.path / "out"
    config = _check_config(out / CONFIG)
    # Keys only where what runs changes: the first and the last planned size at least.
    assert {"1", "64"} <= set(config)
    assert {e["backend_type"] for e in config.values()} <= {"gloo", "cpu_shm"}

    evidence = json.loads((out / EVIDENCE).read_text())
    assert evidence["format"] == "pytest-allreduce-evidence"
    assert evidence["world_size"] == 2 and evidence["hidden"] == 4096
    assert evidence["config"]["file"] == CONFIG.name
    report = (out / REPORT).read_text()
    assert report.strip(), "empty report"
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _temp_leftovers(out) == []

    lines = result.stdout.lines
    summary = "\n".join(lines[lines.index(next(ln for ln in lines if "= allreduce =" in ln)) :])
    assert "backend matrix (cpu):" in summary
    assert re.search(r"^\s+gloo\s+tp2\s+ran\s*$", summary, re.M), summary
    assert re.search(r"^\s+cpu_shm\s+tp2\s+ran\s*$", summary, re.M), summary
    # The GPU backends are one line on the CPU (issue 14: not one row each).
    assert re.search(
        r"^\s+\d+ cuda backends\s+tp2\s+skipped\s+built for cuda; this session runs on cpu: "
        r"(\w+, )*nccl, ",
        summary,
        re.M,
    ), summary
    assert not re.search(r"^\s+nccl\s+tp2", summary, re.M), summary
    # The session-end work says what it does while it runs, before the summary.
    progress = "\n".join(lines[: lines.index(next(ln for ln in lines if "= allreduce =" in ln))])
    assert "allreduce: selection for tp2 h4096 bfloat16: " in progress, progress
    assert re.search(r"^allreduce: writing 5 artifacts to out$", progress, re.M), progress
    assert re.search(r"^artifacts \(\d+ files\) in out:$", summary, re.M), summary
    for artifact in (CONFIG, EVIDENCE, REPORT, PLOT):
        assert re.search(rf"^\s+{re.escape(str(Path('out', artifact)))}$", summary, re.M), artifact

    # 8. the pytest process never initialised CUDA (the ranks own the devices).
    watch = json.loads((pytester.path / "cuda_watch.json").read_text())
    assert watch == {"initialized": False, "attempts": []}


# ---- 6. a second run replaces the artifacts ----------------------------------------------------


def test_second_run_replaces_artifacts_atomically_and_a_usage_error_touches_nothing(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\n")
    common = (
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "pytest_allreduce.suites",
        "--allreduce-backends=gloo",
        "--allreduce-output-dir=out",
        "--allreduce-timeout=60",
    )
    out = pytester.path / "out"
    first = pytester.runpytest_subprocess(
        *common, "--allreduce-batch-sizes=1,8", "--allreduce-max-tokens=8", "-q", timeout=300
    )
    assert first.ret == pytest.ExitCode.OK, first.stdout.str()
    assert "allreduce: " not in first.stdout.str()  # no progress lines under -q
    assert set(_check_config(out / CONFIG)) == {"1", "8"}
    files_first = _files(out)
    assert {str(CONFIG), str(EVIDENCE), str(REPORT)} <= files_first.keys()

    second = pytester.runpytest_subprocess(
        *common, "--allreduce-batch-sizes=2,16", "--allreduce-max-tokens=16", timeout=300
    )
    assert second.ret == pytest.ExitCode.OK, second.stdout.str()
    assert set(_check_config(out / CONFIG)) == {"2", "16"}
    files_second = _files(out)
    assert files_second.keys() == files_first.keys()
    for name, stat in files_second.items():
        # Written to a new file and renamed over the old one: a reader holding the old file
        # kept it whole, and never saw a half-written one.
        assert stat.st_ino != files_first[name].st_ino, f"{name} was rewritten in place"
        assert stat.st_size > 0, name
        if name.endswith(".json"):
            json.loads((out / name).read_text())  # complete, valid JSON
    evidence_sizes = set(_values_of("batch_size", json.loads((out / EVIDENCE).read_text())))
    assert {2, 16} <= evidence_sizes and not {8} & evidence_sizes, evidence_sizes
    assert _temp_leftovers(out) == []

    # A usage error after a good run leaves the good run's artifacts exactly as they were.
    snapshot = {name: (out / name).read_bytes() for name in files_second}
    bad = pytester.runpytest("--allreduce-output-dir=out", "--allreduce-batch-sizes=0")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    after = _files(out)
    assert after.keys() == files_second.keys()
    for name, stat in after.items():
        assert (stat.st_ino, stat.st_mtime_ns) == (
            files_second[name].st_ino,
            files_second[name].st_mtime_ns,
        ), name
        assert (out / name).read_bytes() == snapshot[name]


# ---- 7. availability voting --------------------------------------------------------------------

PICKY_BACKEND_PY = """
import torch

from pytest_allreduce.backend import Backend, Limits, VariantSpec


class PickyBackend(Backend):
    name = "picky"
    variants = (VariantSpec(),)

    @classmethod
    def limits(cls, variant, world_size):
        return Limits(device="cpu", dtypes=("float32", "float16", "bfloat16"))

    @classmethod
    def probe(cls, ctx, variant):
        return "rank one says no" if ctx.rank == 1 else None

    def setup(self):
        raise AssertionError("set up although rank 1 said no")

    def _all_reduce(self, inp, out):
        raise AssertionError("called although rank 1 said no")
"""


def test_backend_that_one_rank_refuses_is_skipped_naming_the_rank(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\n")
    # Importable by the spawned ranks (they unpickle the class by module name).
    pytester.makepyfile(picky_backend=PICKY_BACKEND_PY)
    pytester.makeconftest(
        """
        from picky_backend import PickyBackend


        def pytest_allreduce_register_backends(registry):
            registry.register(PickyBackend)
        """
    )
    pytester.makepyfile(
        test_sum="""
        import pytest

        from pytest_allreduce import checks

        pytestmark = pytest.mark.allreduce_suite("numerics")


        def test_exact_sum(allreduce):
            reports = allreduce.run(checks.exact_sum, allreduce.case.batch_size)
            assert not [p for r in reports for p in r.problems]
        """
    )
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-rs",
        "--allreduce-backends=gloo,picky",
        "--allreduce-batch-sizes=1,8",
        "--allreduce-max-tokens=8",
        "--allreduce-max-tokens=8",
        "--allreduce-timeout=30",
        timeout=120,
    )
    elapsed = time.monotonic() - start
    result.assert_outcomes(passed=2, skipped=2)
    output = result.stdout.str()
    reason = "picky unavailable at world size 2: rank 1: rank one says no"
    # -rs lists both skipped cases (as one line, counted).
    assert re.search(rf"^SKIPPED \[2\] test_sum\.py:\d+: {re.escape(reason)}$", output, re.M), (
        output
    )
    assert "rank 0:" not in output
    assert re.search(r"^\s+picky\s+tp2\s+skipped\s+rank 1: rank one says no$", output, re.M)
    assert re.search(r"^\s+gloo\s+tp2\s+ran\s*$", output, re.M)
    assert elapsed < 60, f"the session took {elapsed:.0f} s"


# ---- 9. torchrun -------------------------------------------------------------------------------

RANK_REPORT_PY = """
import json
import os

import pytest

passed = []
failed = []


def pytest_runtest_logreport(report):
    if report.passed and report.when == "call":
        passed.append(report.nodeid)
    elif report.failed:
        failed.append(report.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    from pytest_allreduce.plugin import SESSION_KEY

    allreduce = session.config.stash[SESSION_KEY]
    state = {
        "exitstatus": int(exitstatus),
        "passed": passed,
        "failed": failed,
        "torchrun": allreduce.torchrun,
        "is_writer": allreduce.is_writer,
        "artifacts": [str(p) for p in allreduce.report.artifacts],
    }
    path = session.config.invocation_params.dir / f"rank{os.environ['RANK']}.json"
    path.write_text(json.dumps(state))
"""


def test_under_torchrun_both_ranks_pass_and_only_rank_zero_writes(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(rank_report=RANK_REPORT_PY)
    result = pytester.run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pytest",
        "-p",
        "rank_report",
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "pytest_allreduce.suites",
        "--allreduce-backends=gloo",
        "--allreduce-batch-sizes=1,8",
        "--allreduce-max-tokens=8",
        "--allreduce-max-tokens=8",
        "--allreduce-output-dir=out",
        "--allreduce-timeout=60",
        timeout=300,
    )
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    ranks = [json.loads((pytester.path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for state in ranks:
        assert state["torchrun"] is True
        assert state["exitstatus"] == 0
        assert state["failed"] == []
        assert len(state["passed"]) > 0
    assert ranks[0]["passed"] == ranks[1]["passed"]
    assert ranks[0]["is_writer"] is True and ranks[1]["is_writer"] is False
    assert str(Path("out", CONFIG)) in ranks[0]["artifacts"]
    assert ranks[1]["artifacts"] == []
    assert set(_check_config(pytester.path / "out" / CONFIG)) == {"1", "8"}
