"""Complete or partial: only a run that covered its whole plan replaces a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_allreduce.checktable import checks_of
from pytest_allreduce.coverage import coverage, session_gaps
from pytest_allreduce.model import Availability, Latency, Verdict
from pytest_allreduce.plan import Plan
from pytest_allreduce.registry import BackendRegistry
from pytest_allreduce.results import ResultStore

SIZES = (1, 8)
NUMERICS = tuple(check.name for check in checks_of("numerics"))


def plan() -> Plan:
    registry = BackendRegistry()
    registry.load_builtins()
    return Plan(
        device="cpu",
        gpu_count=0,
        variants=tuple(registry.resolve(["gloo", "cpu_shm", "nccl"])),
        world_sizes=(2,),
        hidden_sizes=(64,),
        dtypes=("bfloat16",),
        batch_sizes=SIZES,
        max_tokens=8,
    )


def full_store(p: Plan) -> ResultStore:
    """Everything the plan asks for: nccl refused (a CUDA backend), the rest checked and
    timed at every planned size."""
    store = ResultStore("cpu")
    for variant in p.variants:
        store.declare(variant.info)
        available = variant.name != "nccl"
        store.record_availability(
            Availability(variant.name, 2, available, "" if available else "cuda")
        )
    for target in p.targets():
        if target.backend == "nccl":
            continue
        for rows in SIZES:
            case = target.at(rows)
            for check in NUMERICS:
                store.record_verdict(
                    case, Verdict("numerics", "passed", "", f"{check}-{case.label}")
                )
            for job in ("allreduce", "fused"):
                store.record_latency(Latency(case, job, [1.0], 1, "wall_clock", rows * 128))
    return store


def gaps(p: Plan, store: ResultStore, run: list[str] | None = None) -> tuple[str, ...]:
    return coverage(p, store, run or [])[(2, 64)].gaps


def test_everything_planned_checked_and_timed_is_complete() -> None:
    p = plan()
    covered = coverage(p, full_store(p), [])[(2, 64)]
    assert covered.complete and covered.describe() == "complete"


def test_a_check_not_run_at_one_planned_size_is_a_gap() -> None:
    p = plan()
    store = full_store(p)
    case = next(t for t in p.targets() if t.backend == "gloo").at(8)
    store.verdicts[case]["numerics"].pop()
    (gap,) = gaps(p, store)
    assert "numerics suite did not run every check at 1 planned case(s) (gloo bfloat16 at 8)" in gap


def test_a_job_not_timed_is_a_gap_and_a_skipped_latency_test_is_not() -> None:
    p = plan()
    store = full_store(p)
    case = next(t for t in p.targets() if t.backend == "cpu_shm").at(1)
    del store.latencies[(case, "allreduce")]
    (gap,) = gaps(p, store)
    assert "latency suite did not time both jobs" in gap
    del store.latencies[(case, "fused")]
    store.record_verdict(case, Verdict("latency", "skipped", "past its limit", "lat"))
    assert gaps(p, store) == ()


def test_a_target_no_test_reached_is_a_gap() -> None:
    p = plan()
    store = full_store(p)
    del store.availability[("cpu_shm", 2)]
    (gap,) = gaps(p, store)
    assert gap == "no test reached cpu_shm bfloat16"


def test_a_session_that_did_not_pass_is_never_complete() -> None:
    p = plan()
    assert session_gaps(0, 0) == []
    assert session_gaps(1, 3) == ["3 test(s) failed"]
    assert session_gaps(2, 0) == ["the session was interrupted"]
    assert gaps(p, full_store(p), session_gaps(1, 1)) == ("1 test(s) failed",)


# ---- end to end ----------------------------------------------------------------------------

CONFIG = Path("out", "tp2", "allreduce_config_hidden=4096,device=cpu.json")
PARTIAL = CONFIG.with_name("allreduce_config_hidden=4096,device=cpu.partial.json")
EVIDENCE = Path("out", "tp2", "allreduce_evidence_hidden=4096,device=cpu.partial.json")
ARGS = (
    "-p",
    "no:cacheprovider",
    "--pyargs",
    "pytest_allreduce.suites.test_numerics",  # the gating suite
    "pytest_allreduce.suites.test_latency",
    "--allreduce-backends=gloo,cpu_shm",
    "--allreduce-batch-sizes=1,8",
    "--allreduce-max-tokens=8",
    "--allreduce-output-dir=out",
)


def _assert_partial_beside(
    pytester: pytest.Pytester, result: pytest.RunResult, complete: str, why: str
) -> None:
    assert (pytester.path / CONFIG).read_text() == complete
    out = result.stdout.str()
    assert "this run is partial" in out and why in out, out
    evidence = json.loads((pytester.path / EVIDENCE).read_text())
    assert not evidence["coverage"]["complete"]
    assert any(why in gap for gap in evidence["coverage"]["gaps"])


def test_partial_runs_write_beside_the_complete_config(pytester: pytest.Pytester) -> None:
    """One complete run, then a run of each partial kind into the same output dir (one test:
    each run of the suites costs tens of seconds on a small machine)."""
    pytester.makeini("[pytest]\n")
    first = pytester.runpytest_subprocess(*ARGS, timeout=300)
    assert first.ret == 0, first.stdout.str()
    assert (pytester.path / CONFIG).is_file() and not (pytester.path / PARTIAL).exists()
    assert "this run is partial" not in first.stdout.str()
    complete = (pytester.path / CONFIG).read_text()

    # -k: a check left out.
    result = pytester.runpytest_subprocess(*ARGS, "-k", "not rounded_sum", timeout=300)
    assert result.ret == 0, result.stdout.str()
    assert (pytester.path / PARTIAL).is_file()
    _assert_partial_beside(pytester, result, complete, "the numerics suite did not run every check")

    # --deselect: one timing left out.
    collected = pytester.runpytest_subprocess(*ARGS, "--collect-only", "-q", timeout=300)
    node = next(
        line.strip()
        for line in collected.stdout.lines
        if "test_latency" in line and "bs8-fused" in line
    )
    result = pytester.runpytest_subprocess(*ARGS, "--deselect", node, timeout=300)
    assert result.ret == 0, result.stdout.str()
    _assert_partial_beside(pytester, result, complete, "the latency suite did not time both jobs")

    # A failing test anywhere in the session.
    pytester.makepyfile(test_broken="def test_broken():\n    assert False\n")
    result = pytester.runpytest_subprocess(*ARGS, "test_broken.py", timeout=300)
    assert result.ret == 1, result.stdout.str()
    _assert_partial_beside(pytester, result, complete, "1 test(s) failed")

    # The gating suite not run: nothing is eligible, so no config at all, partial evidence.
    (pytester.path / PARTIAL).unlink()
    latency_only = [a for a in ARGS if a != "pytest_allreduce.suites.test_numerics"]
    result = pytester.runpytest_subprocess(*latency_only, timeout=300)
    assert result.ret == 0, result.stdout.str()
    assert not (pytester.path / PARTIAL).exists()
    _assert_partial_beside(pytester, result, complete, "the numerics suite did not run every check")
