"""The accuracy suite end to end on the CPU: the tiny model through gloo and cpu_shm passes,
a backend that loses one rank's share of one row in 64 fails it and is kept out of the config,
and one that is off by a rounding step fails token identity but not the top-5 rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the accuracy suite needs the gsm8k extra")
pytest.importorskip("transformers", reason="the accuracy suite needs the gsm8k extra")

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"

FAULTY_PY = """
import torch
import torch.distributed as dist

from pytest_allreduce.backend import Backend, Limits, VariantSpec


class _Faulty(Backend):
    simplicity = 60

    @classmethod
    def limits(cls, variant, world_size):
        return Limits(device="cpu", dtypes=("float32", "float16", "bfloat16"))

    @classmethod
    def probe(cls, ctx, variant):
        return None

    def setup(self):
        pass


class DropShare(_Faulty):
    \"\"\"Loses rank 1's share of rows 0, 64, 128, ...: a stale or partial row.\"\"\"

    name = "drop_share"
    variants = (VariantSpec(server_type="cpu_shm"),)

    def _all_reduce(self, inp, out):
        out.copy_(inp)
        if self.ctx.rank == 1:
            out[::64] = 0
        dist.all_reduce(out, group=self.ctx.cpu_group)


class OffByRounding(_Faulty):
    \"\"\"Every sum one bfloat16 rounding step (2**-8 relative) too large: numerically close,
    but not the correctly rounded sum a correct allreduce gives at world size 2.\"\"\"

    name = "off_by_rounding"
    variants = (VariantSpec(server_type="cpu_shm"),)

    def _all_reduce(self, inp, out):
        out.copy_(inp)
        dist.all_reduce(out, group=self.ctx.cpu_group)
        out.mul_(1 + 2.0**-8)
"""

CONFTEST_PY = """
from faulty import DropShare, OffByRounding


def pytest_allreduce_register_backends(registry):
    registry.register(DropShare)
    registry.register(OffByRounding)
"""


@pytest.fixture
def faulty_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    if not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"GSM8K data not found at {GSM8K}")
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(faulty=FAULTY_PY)
    pytester.makeconftest(CONFTEST_PY)
    return pytester


def test_faulty_backends_fail_the_accuracy_suite(faulty_dir: pytest.Pytester) -> None:
    result = faulty_dir.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "pytest_allreduce.suites",
        "-k",
        "accuracy",
        "--allreduce-backends=gloo,cpu_shm,drop_share,off_by_rounding",
        f"--allreduce-gsm8k-data={GSM8K}",
        "--allreduce-gsm8k-limit=3",
        "--allreduce-output-dir=out",
        timeout=600,
    )
    result.assert_outcomes(passed=2, failed=2)
    output = result.stdout.str()
    summary = json.loads((faulty_dir.path / "out" / "tp2" / "gsm8k-summary.json").read_text())
    backends = summary["backends"]
    assert summary["reference"] == "gloo" and summary["n"] == 3
    assert backends["gloo"]["verdict"] == backends["cpu_shm"]["verdict"] == "passed"
    assert backends["cpu_shm"]["token_identical"] is True
    dropped = backends["drop_share"]
    assert dropped["verdict"] == "failed" and dropped["token_identical"] is False
    assert any("outside the other's top 5" in p for p in dropped["problems"]), dropped
    rounded = backends["off_by_rounding"]
    assert rounded["verdict"] == "failed" and rounded["token_identical"] is False
    assert any("not token-identical" in p for p in rounded["problems"]), rounded
    assert not any("top 5" in p for p in rounded["problems"]), rounded
    assert "not token-identical to gloo" in output
