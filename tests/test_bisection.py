"""End to end on the CPU: refinement puts config keys beside crossovers and consumer limits,
in a spawned pool and under torchrun, and two runs of one plan write the same config.

The crossover is made with known delays: a `sitecustomize` module on PYTHONPATH, which every
process of the run imports at start-up (pytest and each spawned or torchrun rank), slows the
real gloo and cpu_shm backends by fixed sleeps that dwarf this machine's own noise. The
consumer's choices are between its real entries, so only those backends can make one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

CONFIG = Path("out", "tp2", "allreduce_config_hidden=4096,device=cpu.json")
CROSSOVER_ROWS = 16  # cpu_shm is 10x faster up to here, 3x slower above

SITECUSTOMIZE_PY = f"""
import time

from pytest_allreduce.backends.cpu_shm import CpuShmBackend
from pytest_allreduce.backends.gloo import GlooBackend


def _delayed(cls, delay):
    inner = cls._all_reduce

    def _all_reduce(self, inp, out):
        inner(self, inp, out)
        time.sleep(delay(inp.shape[0]))

    cls._all_reduce = _all_reduce


_delayed(GlooBackend, lambda rows: 0.03)
_delayed(CpuShmBackend, lambda rows: 0.003 if rows <= {CROSSOVER_ROWS} else 0.09)
"""

# The suites selection needs (the gating numerics and the timing): the stress and limit
# suites would only repeat the delayed calls thousands of times.
SUITES = ("pytest_allreduce.suites.test_numerics", "pytest_allreduce.suites.test_latency")
ARGS = (
    "-p",
    "no:cacheprovider",
    "--pyargs",
    *SUITES,
    "--allreduce-batch-sizes=1,2,8,64",
    "--allreduce-max-tokens=64",
    "--allreduce-output-dir=out",
    "--allreduce-timeout=60",
)


@pytest.fixture
def delayed(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    site = pytester.mkdir("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE_PY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    pytester.makeini("[pytest]\n")
    return pytester


def _picks(config_path: Path) -> dict[int, str]:
    return {int(k): v["backend_name"] for k, v in json.loads(config_path.read_text()).items()}


def _check_crossover(config_path: Path) -> None:
    picks = _picks(config_path)
    shm = [k for k, name in picks.items() if name == "cpu_shm"]
    gloo = [k for k, name in picks.items() if name == "gloo"]
    assert shm and gloo, picks
    assert max(shm) < min(gloo), picks
    # Keys on both sides of the crossover, close together.
    assert max(shm) <= CROSSOVER_ROWS < min(gloo), picks
    assert min(gloo) - max(shm) <= 2, picks
    assert 1 in picks and 64 in picks, picks


def test_refinement_puts_keys_on_both_sides_of_the_crossover_the_same_in_two_runs(
    delayed: pytest.Pytester,
) -> None:
    first = delayed.runpytest_subprocess(*ARGS, timeout=400)
    assert first.ret == 0, first.stdout.str()
    _check_crossover(delayed.path / CONFIG)
    text = (delayed.path / CONFIG).read_text()
    second = delayed.runpytest_subprocess(
        *ARGS[:-2], "--allreduce-output-dir=again", "--allreduce-timeout=60", timeout=400
    )
    assert second.ret == 0, second.stdout.str()
    again = delayed.path / "again" / CONFIG.relative_to("out")
    assert again.read_text() == text


def test_refinement_under_torchrun_runs_on_every_rank(delayed: pytest.Pytester) -> None:
    result = delayed.run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pytest",
        *ARGS,
        timeout=500,
    )
    # Without every rank in the session-end measurements, rank 0 would wait out the 30 s
    # call bound and end the job with its stacks: a non-zero exit.
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    _check_crossover(delayed.path / CONFIG)


def test_keys_on_both_sides_of_the_consumers_size_limit(pytester: pytest.Pytester) -> None:
    """cpu_shm takes 16 MiB: at hidden 65536 in float32 that is 64 rows. Above it the cpu_shm
    entry runs gloo, so the config needs keys at 64 and 65 whatever wins."""
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--pyargs",
        *SUITES,
        "--allreduce-hidden-sizes=65536",
        "--allreduce-dtypes=float32",
        "--allreduce-batch-sizes=1,8",
        "--allreduce-max-tokens=96",
        "--allreduce-output-dir=out",
        timeout=400,
    )
    assert result.ret == 0, result.stdout.str()
    config = json.loads(
        (
            pytester.path / "out" / "tp2" / "allreduce_config_hidden=65536,device=cpu.json"
        ).read_text()
    )
    keys = [int(k) for k in config]
    # The tail stops where nothing changes any more: just past the limit, not at 96.
    assert keys[-1] == 65 and {64, 65} <= set(keys), keys
    assert config["65"]["backend_name"] == "gloo"
    evidence = json.loads(
        (
            pytester.path / "out" / "tp2" / "allreduce_evidence_hidden=65536,device=cpu.json"
        ).read_text()
    )
    entries = {e["entry"]: e for e in evidence["dtypes"]["float32"]["selection"]["entries"]["65"]}
    assert entries["cpu_shm"]["runs"] == "gloo"
    assert entries["cpu_shm"]["declined"][0].startswith("cpu_shm: ")
