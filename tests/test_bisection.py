"""End to end: a winner that changes between two batch sizes is bisected, in a spawned pool
and under torchrun (where every rank must take part in the session-end measurements)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

CONFIG = Path("out", "tp2", "allreduce_config_hidden=4096,device=cpu.json")
CROSSOVER_ROWS = 20  # fast_small is faster up to here, fast_big above

# Two backends over gloo, each 25 ms slower on one side of CROSSOVER_ROWS: far beyond noise,
# so the selection must flip there and bisection must pin the flip between adjacent keys.
CROSSOVER_PY = f"""
import time

import torch.distributed as dist

from pytest_allreduce.backend import Backend, Limits, VariantSpec


class _Delayed(Backend):
    variants = (VariantSpec(server_type="cpu_shm"),)
    slow_when_small = False

    @classmethod
    def limits(cls, variant, world_size):
        return Limits(device="cpu", dtypes=("float32", "float16", "bfloat16"))

    @classmethod
    def probe(cls, ctx, variant):
        return None

    def setup(self):
        pass

    def _all_reduce(self, inp, out):
        out.copy_(inp)
        dist.all_reduce(out, group=self.ctx.cpu_group)
        if (inp.shape[0] <= {CROSSOVER_ROWS}) == self.slow_when_small:
            time.sleep(0.025)


class FastBig(_Delayed):
    name = "fast_big"
    slow_when_small = True
    simplicity = 20


class FastSmall(_Delayed):
    name = "fast_small"
    simplicity = 21
"""

CONFTEST_PY = """
from crossover import FastBig, FastSmall


def pytest_allreduce_register_backends(registry):
    registry.register(FastBig)
    registry.register(FastSmall)
"""

ARGS = (
    "-p",
    "no:cacheprovider",
    "--pyargs",
    "pytest_allreduce.suites",
    "--allreduce-backends=fast_small,fast_big",
    "--allreduce-batch-sizes=1,64",
    "--allreduce-output-dir=out",
    "--allreduce-timeout=30",
)


def _check_crossover(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    picks = {int(k): v["backend_name"] for k, v in config.items()}
    assert picks[1] == "fast_small" and picks[64] == "fast_big", picks
    small = max(k for k, name in picks.items() if name == "fast_small")
    big = min(k for k, name in picks.items() if name == "fast_big")
    # Keys on both sides of the crossover, close together, and nothing out of order.
    assert small <= CROSSOVER_ROWS < big, picks
    assert big - small <= 2, picks
    assert all(name == "fast_small" for k, name in picks.items() if k <= small), picks
    assert len(picks) > 2, "no size between 1 and 64 was measured"


@pytest.fixture
def crossover_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(crossover=CROSSOVER_PY)
    pytester.makeconftest(CONFTEST_PY)
    return pytester


def test_bisection_puts_config_keys_on_both_sides_of_the_crossover(
    crossover_dir: pytest.Pytester,
) -> None:
    result = crossover_dir.runpytest_subprocess(*ARGS, timeout=240)
    assert result.ret == 0, result.stdout.str()
    _check_crossover(crossover_dir.path / CONFIG)


def test_bisection_under_torchrun_runs_on_every_rank(crossover_dir: pytest.Pytester) -> None:
    result = crossover_dir.run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pytest",
        *ARGS,
        timeout=300,
    )
    # Without every rank in the session-end measurements, rank 0 would wait out the 30 s
    # call bound and end the job with its stacks: a non-zero exit.
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    _check_crossover(crossover_dir.path / CONFIG)
