"""pytest-xdist: GPU shares per worker, results merged on the controller, one selection.

The unit tests drive the controller's hooks with stand-in nodes; the pytester runs start a
real controller and real workers (subprocesses, so that spawned ranks start clean).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_allreduce.model import Availability, Latency, Target, VariantInfo, Verdict
from pytest_allreduce.results import ResultStore
from pytest_allreduce.results_transfer import dump_results, merge_results
from pytest_allreduce.xdist_roles import (
    DEVICES_KEY,
    RESULTS_KEY,
    XdistController,
    split_devices,
)

pytest.importorskip("xdist")

CASE = Target("fast_wrong", 2, 64, "bfloat16").at(8)


def _store() -> ResultStore:
    store = ResultStore("cpu")
    store.declare(VariantInfo("fast_wrong", "cpu_shm", False, 10))
    return store


# ---- results travel as plain data --------------------------------------------------------------


def test_results_round_trip_and_a_failure_on_any_worker_fails_the_case() -> None:
    one = _store()
    one.record_availability(Availability("fast_wrong", 2, True, "", {"device": "cpu"}))
    one.record_verdict(CASE, Verdict("numerics", "passed", "", "test_more.py::test_runs"))
    one.record_latency(Latency(CASE, "fused", [1.5, 2.25, 1.0 / 3], 1, "wall_clock", 1024, "x"))
    one.machine = {"device_type": "cpu", "device_name": "cpu"}
    other = _store()
    other.record_availability(Availability("fast_wrong", 2, False, "rank 1: no", {}))
    other.record_verdict(CASE, Verdict("numerics", "failed", "exact sum", "test_exact.py::t"))

    merged = _store()
    text = dump_results(one)
    assert isinstance(text, str)  # the only kind of value execnet is sure to carry
    merge_results(merged, text, "xdist worker gw0")
    assert merged.eligible(CASE)
    assert merged.latency(CASE, "fused") == one.latency(CASE, "fused")  # floats exact
    assert merged.machine == one.machine
    merge_results(merged, dump_results(other), "xdist worker gw1")
    assert merged.suite_outcome(CASE, "numerics") == "failed"
    assert not merged.eligible(CASE)
    refusal = merged.availability[("fast_wrong", 2)]
    assert not refusal.available and refusal.reason == "xdist worker gw1: rank 1: no"


def test_results_in_another_format_are_refused() -> None:
    with pytest.raises(ValueError, match="results from gw0 are in format"):
        merge_results(_store(), json.dumps({"format": "other"}), "gw0")


# ---- GPU shares ----------------------------------------------------------------------------


def test_devices_split_into_equal_disjoint_shares() -> None:
    ids = ["4", "5", "6", "7", "GPU-a", "GPU-b", "GPU-c", "GPU-d", "spare"]
    assert split_devices(ids, 4) == [
        ["4", "5"],
        ["6", "7"],
        ["GPU-a", "GPU-b"],
        ["GPU-c", "GPU-d"],
    ]
    assert split_devices(ids[:3], 4) == [[], [], [], []]


def _node(worker: str, output: dict | None = None) -> SimpleNamespace:
    node = SimpleNamespace(workerinput={"workerid": worker})
    if output is not None:
        node.workeroutput = output
    return node


def test_a_share_returns_when_its_worker_goes_down_and_a_crash_is_noted() -> None:
    session = SimpleNamespace(store=_store(), report=SimpleNamespace(notes=[]))
    controller = XdistController(session, [["0", "1"], ["2", "3"]])  # type: ignore[arg-type]
    gw0, gw1 = _node("gw0"), _node("gw1")
    controller.pytest_configure_node(gw0)
    controller.pytest_configure_node(gw1)
    assert (gw0.workerinput[DEVICES_KEY], gw1.workerinput[DEVICES_KEY]) == ("0,1", "2,3")

    # gw1 crashes (xdist gives no workeroutput) and is replaced by gw2: it gets gw1's GPUs.
    controller.pytest_testnodedown(gw1, "worker 'gw1' crashed while running 'test_x'")
    assert session.report.notes == [
        "xdist worker gw1 went down without its results (worker 'gw1' crashed while running "
        "'test_x'); the sizes it measured are missing from this session's selection"
    ]
    gw2 = _node("gw2")
    controller.pytest_configure_node(gw2)
    assert gw2.workerinput[DEVICES_KEY] == "2,3"

    worker_store = _store()
    worker_store.record_verdict(CASE, Verdict("numerics", "passed"))
    finished = _node("gw0", {"exitstatus": 0, RESULTS_KEY: dump_results(worker_store)})
    controller.pytest_testnodedown(finished, None)
    assert session.store.suite_outcome(CASE, "numerics") == "passed"
    assert len(session.report.notes) == 1


def test_cpu_sessions_hand_out_no_devices() -> None:
    session = SimpleNamespace(store=_store(), report=SimpleNamespace(notes=[]))
    controller = XdistController(session, None)  # type: ignore[arg-type]
    node = _node("gw0")
    controller.pytest_configure_node(node)
    assert DEVICES_KEY not in node.workerinput


# ---- a real controller and workers -------------------------------------------------------------

# Stands in for GPUs on a machine without any: the plan counts the entries of
# CUDA_VISIBLE_DEVICES, so shares can be handed out and checked without a driver.
FAKE_GPUS_PY = """
import os

import pytest_allreduce.plan as plan


def _count():
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in visible.split(",") if d.strip()])


plan.visible_gpu_count = _count
"""

RECORD_DEVICES_PY = """
import json
import os


def test_devices(request):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    out = request.config.invocation_params.dir / f"devices-{worker}.json"
    out.write_text(json.dumps(os.environ["CUDA_VISIBLE_DEVICES"]))
"""


def test_each_worker_sees_its_own_gpus_and_a_share_too_small_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(fake_gpus=FAKE_GPUS_PY, test_devices=RECORD_DEVICES_PY)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    common = ("-p", "fake_gpus", "-p", "no:cacheprovider", "--allreduce-backends=nccl")
    result = pytester.runpytest_subprocess(*common, "-n", "2", "test_devices.py", timeout=120)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    seen = {p.stem: json.loads(p.read_text()) for p in pytester.path.glob("devices-gw*.json")}
    # One test, so one worker ran it; its share is one of the two halves, not the whole.
    assert len(seen) == 1 and next(iter(seen.values())) in ("4,5", "6,7"), seen
    for path in pytester.path.glob("devices-gw*.json"):
        path.unlink()

    # Without an allreduce option (nor the suites) the session is another project's: its
    # workers see every GPU, as they would without this plugin.
    untouched = pytester.runpytest_subprocess(
        "-p", "fake_gpus", "-p", "no:cacheprovider", "-n", "2", "test_devices.py", timeout=120
    )
    assert untouched.ret == pytest.ExitCode.OK, untouched.stdout.str()
    seen = {p.stem: json.loads(p.read_text()) for p in pytester.path.glob("devices-gw*.json")}
    assert list(seen.values()) == ["4,5,6,7"], seen

    refused = pytester.runpytest_subprocess(
        *common, "-n", "3", "--allreduce-output-dir=out", "test_devices.py", timeout=120
    )
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    error = refused.stderr.str()
    assert "--allreduce-world-sizes=2: -n 3 leaves each xdist worker 1 of the 4 visible " in error
    assert "use -n 2" in error
    assert not (pytester.path / "out").exists()


# The CPU backends as the CPU runtime runs them (the config names backend types, so only
# the variant the consumer runs for a type can win it). cpu_shm is the faster one here; one
# check, on one worker, fails it at 8 rows. A failure at any size keeps a backend out of the
# whole config, so cpu_shm must not win even at 1 row, where everything of it passed, and the
# other worker's timings (where it is fastest) must not bring it back.
TEST_EXACT_PY = """
import pytest

from pytest_allreduce import checks

pytestmark = pytest.mark.allreduce_suite("numerics")


def test_exact_sum(allreduce):
    reports = allreduce.run(checks.exact_sum, allreduce.case.batch_size)
    assert not [p for r in reports for p in r.problems]
    planted = allreduce.case.target.backend == "cpu_shm" and allreduce.case.batch_size == 8
    assert not planted, "a failure planted at cpu_shm, 8 rows"
"""

TEST_TIMED_PY = """
import pytest


def _runs(ctx, work):
    return ctx.rank


@pytest.mark.allreduce_suite("numerics")
def test_runs_on_every_rank(allreduce):
    assert allreduce.run(_runs) == [0, 1]


@pytest.mark.allreduce_suite("latency")
@pytest.mark.usefixtures("allreduce_benchmark")
@pytest.mark.parametrize("job", ["allreduce", "fused"])
def test_latency(allreduce, job):
    assert all(s > 0 for s in allreduce.measure(job))
"""


def _config(path: Path) -> dict[int, str]:
    return {int(k): v["backend_name"] for k, v in json.loads(path.read_text()).items()}


def test_a_failure_on_one_worker_and_timings_on_another_give_the_single_process_config(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_exact=TEST_EXACT_PY, test_timed=TEST_TIMED_PY)
    common = (
        "-p",
        "no:cacheprovider",
        "--allreduce-backends=gloo,cpu_shm",
        "--allreduce-hidden-sizes=64",
        "--allreduce-batch-sizes=1,8",
        "--allreduce-max-tokens=8",
        "--allreduce-timeout=60",
    )
    # The runs fail (the planted failure), so the config is written as partial.
    config = Path("tp2", "allreduce_config_hidden=64,device=cpu.partial.json")

    single = pytester.runpytest_subprocess(*common, "--allreduce-output-dir=single", timeout=300)
    assert single.ret == pytest.ExitCode.TESTS_FAILED, single.stdout.str()  # cpu_shm at 8
    single.assert_outcomes(passed=15, failed=1)

    spread = pytester.runpytest_subprocess(
        *common,
        "--allreduce-output-dir=spread",
        "--benchmark-json=spread.json",
        "-n",
        "2",
        "--dist=loadfile",
        "-v",
        timeout=300,
    )
    assert spread.ret == pytest.ExitCode.TESTS_FAILED, spread.stdout.str()
    spread.assert_outcomes(passed=15, failed=1)
    output = spread.stdout.str()
    workers = {
        name: set(re.findall(rf"\[(gw\d)\] .*(?:PASSED|FAILED) {name}", output))
        for name in ("test_exact.py", "test_timed.py")
    }
    assert len(workers["test_exact.py"]) == 1 and len(workers["test_timed.py"]) == 1, workers
    assert workers["test_exact.py"] != workers["test_timed.py"], "the premise: two workers"

    expected = _config(pytester.path / "single" / config)
    assert set(expected.values()) == {"gloo"}, expected
    assert _config(pytester.path / "spread" / config) == expected
    assert "cpu_shm-tp2-h64-bfloat16 is kept out of the config" in output

    # The controller wrote pytest-benchmark's records once, for every latency; workers wrote
    # nothing of their own.
    records = json.loads((pytester.path / "spread.json").read_text())["benchmarks"]
    ours = json.loads((pytester.path / "spread" / "benchmark.json").read_text())["benchmarks"]
    assert {r["fullname"] for r in records} == {r["fullname"] for r in ours}
    assert len(records) == 2 * 2 * 2  # backends x jobs x planned sizes
    assert re.search(r"^artifacts \(5 files\) in spread:$", output, re.M), output
