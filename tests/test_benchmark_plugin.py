"""pytest-benchmark as its users know it: the latency tests are its benchmarks, the session's
latencies its records (table, --benchmark-json, autosave, compare, -only, -skip).

Each session runs in a subprocess on the CPU (gloo and cpu_shm at two small sizes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_allreduce.benchmarking import publish

pytest.importorskip("pytest_benchmark")

TEST_NUM_PY = """
import pytest

from pytest_allreduce import checks

pytestmark = pytest.mark.allreduce_suite("numerics")


def test_exact_sum(allreduce):
    reports = allreduce.run(checks.exact_sum, allreduce.case.batch_size)
    assert not [p for r in reports for p in r.problems]
"""

TEST_LAT_PY = """
import pytest

pytestmark = [
    pytest.mark.allreduce_suite("latency"),
    pytest.mark.usefixtures("allreduce_benchmark"),
]


@pytest.mark.parametrize("job", ["allreduce", "fused"])
def test_latency(allreduce, job):
    assert all(s > 0 for s in allreduce.measure(job))
"""

TEST_PLAIN_PY = """
def test_plain():
    pass
"""

COMMON = (
    "-p",
    "no:cacheprovider",
    "-rs",
    "-W",
    "error::pytest_benchmark.logger.PytestBenchmarkWarning",
    "--allreduce-backends=gloo,cpu_shm",
    "--allreduce-hidden-sizes=64",
    "--allreduce-batch-sizes=1,8",
    "--allreduce-max-tokens=8",
    "--allreduce-timeout=60",
)
# gloo and cpu_shm x 2 sizes x 2 jobs (bisection may add sizes).
LATENCY_TESTS = 8


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_num=TEST_NUM_PY, test_lat=TEST_LAT_PY, test_plain=TEST_PLAIN_PY)
    return pytester


def _records(path: Path) -> dict[str, dict]:
    return {b["fullname"]: b for b in json.loads(path.read_text())["benchmarks"]}


def test_records_reach_the_table_json_autosave_and_compare(project: pytest.Pytester) -> None:
    storage = project.path / "storage"
    first = project.runpytest_subprocess(
        *COMMON,
        "--allreduce-output-dir=out",
        "--benchmark-json=first.json",
        "--benchmark-autosave",
        f"--benchmark-storage={storage}",
        timeout=300,
    )
    assert first.ret == pytest.ExitCode.OK, first.stdout.str()
    first.assert_outcomes(passed=4 + LATENCY_TESTS + 1)
    output = first.stdout.str()
    assert "Benchmark fixture was not used" not in output
    assert re.search(r"benchmark 'fused tp2 hidden=64 bfloat16 bs=8 cpu': 2 tests", output)
    assert re.search(r"^fused\[cpu_shm-tp2-h64-bfloat16-bs8\] ", output, re.M), output

    theirs = _records(project.path / "first.json")
    ours = _records(project.path / "out" / "benchmark.json")
    assert len(theirs) >= LATENCY_TESTS and theirs.keys() == ours.keys()
    for name, record in theirs.items():
        # The same records: the output dir's file is pytest-benchmark's document too.
        assert record["stats"] == ours[name]["stats"], name
        assert record["stats"]["iterations"] == 1  # the CPU times one op per sample
        assert record["stats"]["rounds"] == len(record["stats"]["data"]) > 0
    saved = sorted(storage.rglob("0001_*.json"))
    assert len(saved) == 1
    assert _records(saved[0]).keys() == theirs.keys()
    assert "pytest_allreduce" in json.loads(saved[0].read_text())

    second = project.runpytest_subprocess(
        *COMMON,
        "--allreduce-output-dir=out",
        "--benchmark-autosave",
        f"--benchmark-storage={storage}",
        "--benchmark-compare=0001",
        timeout=300,
    )
    assert second.ret == pytest.ExitCode.OK, second.stdout.str()
    compared = second.stdout.str()
    assert re.search(r"^fused\[gloo-tp2-h64-bfloat16-bs1\] \(0001_", compared, re.M), compared
    assert re.search(r"^fused\[gloo-tp2-h64-bfloat16-bs1\] \(NOW\)", compared, re.M), compared
    assert "machine_info is different" not in compared

    cli = [sys.executable, "-m", "pytest_benchmark", "--storage", str(storage), "compare"]
    done = subprocess.run(
        [*cli, "0001", "0002", "--group-by=group", "--columns=min,median,max,iqr,rounds"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project.path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"fused\[cpu_shm-tp2-h64-bfloat16-bs8\] \(0002_", done.stdout), done.stdout


def test_benchmark_only_runs_the_latency_suite_and_skip_skips_it(
    project: pytest.Pytester,
) -> None:
    only = project.runpytest_subprocess(
        *COMMON, "--allreduce-output-dir=only", "--benchmark-only", timeout=300
    )
    assert only.ret == pytest.ExitCode.OK, only.stdout.str()
    only.assert_outcomes(passed=LATENCY_TESTS, skipped=5)
    output = only.stdout.str()
    assert "Skipping non-benchmark (--benchmark-only active)" in output
    assert "benchmark 'fused tp2 hidden=64 bfloat16 bs=1 cpu'" in output
    # Correctness did not run, so nothing may win: no config, and the summary says why.
    assert "the gating suite(s) numerics did not run" in output
    assert not list((project.path / "only").rglob("allreduce_config_*"))

    skip = project.runpytest_subprocess(
        *COMMON, "--allreduce-output-dir=skip", "--benchmark-skip", timeout=300
    )
    assert skip.ret == pytest.ExitCode.OK, skip.stdout.str()
    skip.assert_outcomes(passed=5, skipped=LATENCY_TESTS)
    assert "Skipping benchmark (--benchmark-skip active)" in skip.stdout.str()
    assert "artifacts: none written (no latency was measured)" in skip.stdout.str()


def test_latency_suite_runs_without_pytest_benchmark(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess(
        *COMMON[:2], *COMMON[5:], "-p", "no:benchmark", "--allreduce-output-dir=out", timeout=300
    )
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=4 + LATENCY_TESTS + 1)
    assert "benchmark '" not in result.stdout.str()
    # Written by pytest-benchmark's functions, since its plugin is not there to ask.
    records = _records(project.path / "out" / "benchmark.json")
    assert len(records) >= LATENCY_TESTS


def test_benchmark_disable_asks_for_no_records() -> None:
    session = SimpleNamespace(benchmarks=[])
    options = {"benchmark_disable": True, "benchmark_enable": False}
    config = SimpleNamespace(
        pluginmanager=SimpleNamespace(get_plugin=lambda name: session),
        getoption=lambda name, default=None: options.get(name, default),
    )
    assert not publish(config, ["record"])  # type: ignore[arg-type]
    options["benchmark_disable"] = False
    assert publish(config, ["record"])  # type: ignore[arg-type]
    assert session.benchmarks == ["record"]
