"""The latency suite end to end on the CPU: one test per size timing every backend together,
a backend that raises at one size, one whose results go wrong while it is timed, and each
one's verdict recorded against itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

# The run fails (two backends do), so its files are partial.
EVIDENCE = Path("out", "tp2", "allreduce_evidence_hidden=64,device=cpu.partial.json")
BAD_ROWS = 8

BACKENDS_PY = f"""
import torch.distributed as dist

from pytest_allreduce.backend import Backend, Limits, VariantSpec


class _Gloo(Backend):
    variants = (VariantSpec(server_type="cpu_shm"),)

    @classmethod
    def limits(cls, variant, world_size):
        return Limits(device="cpu", dtypes=("bfloat16",))

    @classmethod
    def probe(cls, ctx, variant):
        return None

    def setup(self):
        self.calls = {{}}

    def _all_reduce(self, inp, out):
        out.copy_(inp)
        dist.all_reduce(out, group=self.ctx.cpu_group)


class RaisesAtEight(_Gloo):
    name = "raises_at_eight"

    def _all_reduce(self, inp, out):
        if inp.shape[0] == {BAD_ROWS}:
            raise RuntimeError("raises_at_eight gives up at {BAD_ROWS} rows")
        super()._all_reduce(inp, out)


class WrongWhenTimed(_Gloo):
    # Right for the first few calls at a size (what a numerics check makes), then off by one
    # in one element: only a check of the timed loop's output can catch it.
    name = "wrong_when_timed"

    def _all_reduce(self, inp, out):
        super()._all_reduce(inp, out)
        rows = inp.shape[0]
        self.calls[rows] = self.calls.get(rows, 0) + 1
        if rows == {BAD_ROWS} and self.calls[rows] > 4:
            out.view(-1)[0] += 1


class FirstOutputOnly(_Gloo):
    # Keeps the first output buffer it is handed per size and writes every later result
    # there: right as long as a caller always passes the same buffers.
    name = "first_output_only"

    def setup(self):
        self.kept = {{}}

    def _all_reduce(self, inp, out):
        super()._all_reduce(inp, self.kept.setdefault(inp.shape[0], out))
"""

CONFTEST_PY = """
from bad_backends import RaisesAtEight, WrongWhenTimed


def pytest_allreduce_register_backends(registry):
    registry.register(RaisesAtEight)
    registry.register(WrongWhenTimed)
"""


def test_each_backend_is_timed_together_and_judged_on_its_own(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(bad_backends=BACKENDS_PY)
    pytester.makeconftest(CONFTEST_PY)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-rA",
        "--pyargs",
        "pytest_allreduce.suites.test_latency",
        "--allreduce-backends=gloo,raises_at_eight,cpu_shm,wrong_when_timed",
        f"--allreduce-batch-sizes=1,{BAD_ROWS}",
        f"--allreduce-max-tokens={BAD_ROWS}",
        "--allreduce-hidden-sizes=64",
        "--allreduce-output-dir=out",
        "--allreduce-timeout=60",
        timeout=300,
    )
    out = result.stdout.str()

    # One test per size and job; only the size where a backend failed fails.
    for job in ("allreduce", "fused"):
        assert re.search(rf"PASSED .*test_latency\[tp2-h64-bfloat16-bs1-{job}\]", out), out
        assert re.search(rf"FAILED .*test_latency\[tp2-h64-bfloat16-bs{BAD_ROWS}-{job}\]", out)
    result.assert_outcomes(passed=2, failed=2)
    # Each failure names its backend and its own report, and no good backend.
    assert "raises_at_eight failed:" in out and "gives up at 8 rows" in out
    assert "wrong_when_timed failed:" in out and "wrong results while being timed" in out
    assert "1 of 512 elements differ from the exact sum" in out
    assert "gloo failed" not in out and "cpu_shm failed" not in out

    backends = json.loads((pytester.path / EVIDENCE).read_text())["dtypes"]["bfloat16"]
    backends = backends["backends"]
    # The others at the failing size were still measured, every one with the plan's samples.
    for name in ("gloo", "cpu_shm"):
        for rows in ("1", str(BAD_ROWS)):
            at = backends[name]["batch_sizes"][rows]
            assert at["verdicts"]["latency"]["outcome"] == "passed", (name, rows, at)
            for job in ("allreduce", "fused"):
                assert len(at["latency"][job]["samples_us"]) == 8, (name, rows, job)
                assert at["latency"][job]["clock"] == "wall_clock"
    # Verdicts and latencies belong to their own backend; a failed timing is not selectable.
    for name in ("raises_at_eight", "wrong_when_timed"):
        bad = backends[name]["batch_sizes"]
        assert bad[str(BAD_ROWS)]["verdicts"]["latency"]["outcome"] == "failed", name
        assert bad[str(BAD_ROWS)]["latency"] == {}, name
        assert bad["1"]["verdicts"]["latency"]["outcome"] == "passed", name
        assert set(bad["1"]["latency"]) == {"allreduce", "fused"}, name
    checks = backends["raises_at_eight"]["batch_sizes"][str(BAD_ROWS)]["verdicts"]["latency"]
    assert sorted(c["test_id"].split("::")[-1] for c in checks["checks"]) == [
        f"test_latency[tp2-h64-bfloat16-bs{BAD_ROWS}-allreduce]",
        f"test_latency[tp2-h64-bfloat16-bs{BAD_ROWS}-fused]",
    ]
    assert all("gives up at 8 rows" in c["detail"] for c in checks["checks"])


def test_a_users_case_runner_still_measures_one_backend(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(
        test_mine="""
        def test_time_it(allreduce):
            samples = allreduce.measure("allreduce")
            assert len(samples) == 8 and min(samples) > 0
        """
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--allreduce-backends=gloo",
        "--allreduce-batch-sizes=4",
        "--allreduce-max-tokens=4",  # no tail of sizes beyond the one asked for
        "--allreduce-hidden-sizes=64",
        "--allreduce-output-dir=out",
        timeout=120,
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("rotate", [False, True])
def test_rotating_buffers_checks_every_buffer_set(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, rotate: bool
) -> None:
    # 4 rows x hidden 64 x bfloat16 = 512 bytes: rotate=1K gives each instance two buffer
    # sets, ops 0 and 2 on one, 1 and 3 on the other, and the second set's outputs are
    # checked like the first's.
    plan = "samples=2,ops=4,warmup=1" + (",rotate=1K" if rotate else "")
    monkeypatch.setenv("PYTEST_ALLREDUCE_TIMING", plan)
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(bad_backends=BACKENDS_PY)
    pytester.makeconftest(
        "from bad_backends import FirstOutputOnly\n\n\n"
        "def pytest_allreduce_register_backends(registry):\n"
        "    registry.register(FirstOutputOnly)\n"
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "--pyargs", "pytest_allreduce.suites.test_latency",
        "--allreduce-backends=gloo,first_output_only", "--allreduce-batch-sizes=4",
        "--allreduce-max-tokens=4", "--allreduce-hidden-sizes=64", "-k", "not fused",
        "--allreduce-output-dir=out", "--allreduce-timeout=60", timeout=240,
    )  # fmt: skip
    out = result.stdout.str()
    if not rotate:
        # The same buffers for every op: the bug cannot show in the timed loop.
        result.assert_outcomes(passed=1)
        return
    result.assert_outcomes(failed=1)
    assert "first_output_only failed:" in out and "gloo failed" not in out
    assert re.search(r"instance \d buffer set 1: 256 of 256 elements differ", out), out
