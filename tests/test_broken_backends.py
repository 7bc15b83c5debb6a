"""End to end: every backend of `broken_backends.py` is caught by the suites and kept out of
the config, and the run fails; a hang costs one timeout, not one per test.

One session runs the broken allreduce backends beside gloo; the tests below read its
outcome class by class. Smaller sessions cover what needs its own: a build of gloo itself
(what the CPU runtime runs) wrong only between the measured sizes, which only session-end
work can catch; a hang; and quantized outputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
BANDED_CONFTEST_PY = """
from broken_backends import BandedGloo


def pytest_allreduce_register_backends(registry):
    registry.register(BandedGloo, replace=True)
"""
CONFTEST_PY = """
from broken_backends import BROKEN


def pytest_allreduce_register_backends(registry):
    for cls in BROKEN:
        registry.register(cls)
"""
SMALL_PLAN = (
    "--allreduce-batch-sizes=1,32,64",
    "--allreduce-max-tokens=64",
    "--allreduce-hidden-sizes=512",
    "--allreduce-output-dir=out",
)
CONFIG = Path("out", "tp2", "allreduce_config_hidden=512,device=cpu.json")
EVIDENCE = Path("out", "tp2", "allreduce_evidence_hidden=512,device=cpu.json")
BROKEN_SUMS = (
    "truncating_sum",
    "float16_accumulator",
    "ignores_eps",
    "rank_divergent_norm",
    "wrong_from_call_129",
    "racy_back_to_back",
)


@dataclass
class Run:
    ret: int
    output: str
    directory: Path

    def written(self, path: Path) -> Path:
        """The artifact as this run wrote it: complete, or with '.partial' where the run
        covered less than its plan (a failed test); never both."""
        complete = self.directory / path
        partial = complete.with_suffix(".partial.json")
        assert complete.exists() != partial.exists(), (complete, partial.exists())
        if self.ret == 0:
            assert complete.exists(), "a passing run wrote partial files"
        return complete if complete.exists() else partial

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.written(CONFIG).read_text())

    @property
    def evidence(self) -> dict[str, Any]:
        return json.loads(self.written(EVIDENCE).read_text())

    def failed_tests(self, backend: str) -> list[str]:
        """The ids of the failed tests of `backend`, from the short summary."""
        return re.findall(rf"^FAILED \S*?::(\S*-{backend}-\S*\])", self.output, re.M)

    def skipped(self, reason: str) -> int:
        """How many tests were skipped with a reason matching `reason`."""
        lines = re.findall(r"^SKIPPED \[(\d+)\] (.*)$", self.output, re.M)
        return sum(int(count) for count, text in lines if re.search(reason, text))

    def verdicts(self, backend: str) -> dict[int, list[dict[str, Any]]]:
        """Every recorded check of `backend` per batch size (tests and session-end work)."""
        sizes = self.evidence["dtypes"]["bfloat16"]["backends"][backend]["batch_sizes"]
        return {
            int(bs): [c for suite in entry["verdicts"].values() for c in suite["checks"]]
            for bs, entry in sizes.items()
        }

    def exclusion(self, backend: str) -> str:
        """Why the evidence says `backend` is kept out of the config."""
        return self.evidence["dtypes"]["bfloat16"]["backends"][backend]["disqualified"] or ""


def run_session(
    directory: Path, *args: str, timeout: float = 600, conftest: str = CONFTEST_PY
) -> Run:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "broken_backends.py").write_text((HERE / "broken_backends.py").read_text())
    (directory / "conftest.py").write_text(conftest)
    (directory / "pytest.ini").write_text("[pytest]\n")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfs", *args]
    done = subprocess.run(
        command,
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(directory)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Run(done.returncode, done.stdout + done.stderr, directory)


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    backends = ",".join(("gloo", *BROKEN_SUMS))
    return run_session(
        tmp_path_factory.mktemp("broken"),
        "--pyargs",
        "pytest_allreduce.suites",
        f"--allreduce-backends={backends}",
        *SMALL_PLAN,
    )


def test_no_broken_backend_reaches_the_config_and_the_run_fails(broken_run: Run) -> None:
    assert broken_run.ret == 1, broken_run.output
    assert {entry["backend_name"] for entry in broken_run.config.values()} == {"gloo"}
    for backend in BROKEN_SUMS:
        assert "disqualified" in broken_run.exclusion(backend), backend
        assert f"{backend}-tp2-h512-bfloat16 is kept out of the config" in broken_run.output


def test_rounding_truncation_is_caught_by_the_correctly_rounded_sum(broken_run: Run) -> None:
    failed = broken_run.failed_tests("truncating_sum")
    for rows in (1, 3, 32, 64, 127):
        assert f"test_numerics[rounded_sum-truncating_sum-tp2-h512-bfloat16-bs{rows}]" in failed
        assert f"test_numerics[edge_values-truncating_sum-tp2-h512-bfloat16-bs{rows}]" in failed
    # Integer sums need no rounding, so exact_sum cannot see it: the new checks do.
    assert not any("exact_sum" in t for t in failed)


def test_range_a_float16_accumulator_is_caught_by_the_edges(broken_run: Run) -> None:
    failed = broken_run.failed_tests("float16_accumulator")
    for rows in (1, 3, 32, 64, 127):
        assert f"test_numerics[edge_values-float16_accumulator-tp2-h512-bfloat16-bs{rows}]" in (
            failed
        )


def test_small_activations_a_wrong_epsilon_is_caught_by_the_fused_job(broken_run: Run) -> None:
    failed = broken_run.failed_tests("ignores_eps")
    assert len([t for t in failed if "fused_job" in t]) == 5, failed
    assert "eps 1e-06: normalised output" in broken_run.output


def test_ranks_that_end_with_different_bits_are_caught_by_the_digests(broken_run: Run) -> None:
    # Each rank's output is within the norm's bound: the comparison of the ranks' digests
    # is the only check that can see it, at every size the fused job is checked.
    failed = broken_run.failed_tests("rank_divergent_norm")
    assert len([t for t in failed if "fused_job" in t]) == 5, failed
    assert "ranks ended with different results" in broken_run.output
    assert "disqualified" in broken_run.exclusion("rank_divergent_norm")


@pytest.fixture(scope="module")
def band_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """gloo, the backend the CPU runtime runs for every entry, replaced by a build that is
    wrong only between the plan's sizes."""
    return run_session(
        tmp_path_factory.mktemp("band"),
        "--pyargs",
        "pytest_allreduce.suites",
        "--allreduce-backends=gloo",
        *SMALL_PLAN,
        conftest=BANDED_CONFTEST_PY,
    )


def test_sizes_between_keys_a_band_is_caught_at_routed_sizes(band_run: Run) -> None:
    assert "FAILED" not in band_run.output  # every test passed it
    verdicts = band_run.verdicts("gloo")
    failed = {
        bs for bs, checks in verdicts.items() if any(c["outcome"] == "failed" for c in checks)
    }
    assert failed and failed <= set(range(41, 48)), failed
    assert all(
        c["test_id"].startswith("routed size::")
        for bs in failed
        for c in verdicts[bs]
        if c["outcome"] == "failed"
    )


def test_per_size_eligibility_a_late_failure_removes_it_everywhere(broken_run: Run) -> None:
    failed = broken_run.failed_tests("wrong_from_call_129")
    assert any("test_stress[back_to_back-wrong_from_call_129" in t for t in failed), failed
    verdicts = broken_run.verdicts("wrong_from_call_129")
    # Every numerics check passed at the plan's sizes (the old rule let it win there) ...
    for bs in (1, 32, 64):
        numerics = [c for c in verdicts[bs] if c["suite"] == "numerics"]
        assert numerics and all(c["outcome"] == "passed" for c in numerics), bs
    # ... and it is out of the config all the same (checked above for every broken backend).
    assert "stress failed" in broken_run.exclusion("wrong_from_call_129")


def test_stress_a_back_to_back_race_is_caught_at_both_sizes(broken_run: Run) -> None:
    failed = broken_run.failed_tests("racy_back_to_back")
    for rows in (3, 128):
        assert f"test_stress[back_to_back-racy_back_to_back-tp2-h512-bfloat16-bs{rows}]" in failed
    assert "back-to-back calls gave wrong or unwritten elements" in broken_run.output


def test_a_failure_only_session_end_work_finds_fails_the_run(band_run: Run) -> None:
    assert band_run.ret == 1, band_run.output
    assert "check(s) failed in session-end work: routed size::numerics" in band_run.output
    assert "disqualified" in band_run.exclusion("gloo")
    # The only backend is out: no config at all, neither complete nor partial.
    assert not (band_run.directory / CONFIG).exists()
    assert not (band_run.directory / CONFIG.with_suffix(".partial.json")).exists()


def test_a_hang_costs_one_timeout_and_skips_the_rest_of_that_size(tmp_path: Path) -> None:
    run = run_session(
        tmp_path,
        "--pyargs",
        "pytest_allreduce.suites.test_numerics",
        "pytest_allreduce.suites.test_latency",
        "--allreduce-backends=gloo,hangs_at_32",
        "--allreduce-batch-sizes=1,32",
        "--allreduce-max-tokens=32",
        "--allreduce-hidden-sizes=512",
        "--allreduce-output-dir=out",
        "--allreduce-timeout=10",
    )
    first = "test_numerics[exact_sum-hangs_at_32-tp2-h512-bfloat16-bs32]"
    assert run.failed_tests("hangs_at_32") == [first], run.output
    # The three other numerics checks at 32 rows never called the ranks: each was skipped,
    # naming the test that hung; the latency tests at 32 rows (every backend timed together)
    # timed gloo alone.
    reason = rf"hangs_at_32 hung or lost a rank at 32 rows in \S*{re.escape(first)}"
    assert run.skipped(reason) == 3, run.output
    at_32 = run.evidence["dtypes"]["bfloat16"]["backends"]
    assert at_32["hangs_at_32"]["batch_sizes"]["32"]["latency"] == {}
    assert set(at_32["gloo"]["batch_sizes"]["32"]["latency"]) == {"allreduce", "fused"}
    assert run.ret == 1
    assert {entry["backend_name"] for entry in run.config.values()} == {"gloo"}


def test_quantized_outputs_are_checked_against_a_reference_quantization(tmp_path: Path) -> None:
    run = run_session(
        tmp_path,
        "--pyargs",
        "pytest_allreduce.suites.test_numerics",
        "-k",
        "fused_job",
        "--allreduce-backends=quantizing_fused",
        "--allreduce-batch-sizes=1,32",
        "--allreduce-max-tokens=32",
        "--allreduce-hidden-sizes=512",
        "--allreduce-output-dir=out",
    )
    for right in ("quantizing_fused_fp8", "quantizing_fused_nvfp4"):
        assert run.failed_tests(right) == []
    assert len(run.failed_tests("quantizing_fused_fp8_truncated")) == 4
    assert len(run.failed_tests("quantizing_fused_nvfp4_block32")) == 4
    assert "fp8_e4m3 output: values:" in run.output
    assert "nvfp4 output: block scales:" in run.output


def test_the_race_is_caught_every_time_not_three_runs_in_four() -> None:
    from broken_backends import RacyBackToBack

    from pytest_allreduce.checks import back_to_back
    from pytest_allreduce.jobs import Work
    from pytest_allreduce.model import Target
    from pytest_allreduce.pool import RankPool
    from pytest_allreduce.registry import Variant

    variant = Variant(RacyBackToBack, RacyBackToBack.variants[0])
    work = Work(variant, Target(variant.name, 2, 512, "bfloat16"), 128)
    pool = RankPool(2, "cpu", 120).start()
    try:
        # Ten runs of the stress check, every rank of each: the race shows on every one.
        caught = [bool(r.problems) for _ in range(10) for r in pool.run(back_to_back, work, 3)]
    finally:
        pool.close()
    assert all(caught), caught
