"""benchmarks/regret.py on the CPU: what the consumer runs per size against the best."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pytest_allreduce.artifacts.config import write_config
from pytest_allreduce.config import AllreduceConfig, ConfigEntry, config_path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "regret.py"


@pytest.fixture(scope="module")
def regret() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regret_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_default_sizes_are_keys_midpoints_and_doublings(regret: ModuleType) -> None:
    assert regret.default_sizes((1, 8, 64), 100) == (1, 2, 4, 8, 16, 32, 36, 64, 100)


def test_regret_on_the_cpu_writes_one_row_per_size(regret: ModuleType, tmp_path: Path) -> None:
    # cpu_shm at 1 row, gloo from 3; hidden 64 in bfloat16 keeps every call tiny.
    config = AllreduceConfig(
        {1: ConfigEntry("cpu_shm", False, "cpu_shm"), 3: ConfigEntry("gloo", False, "gloo")}
    )
    path = write_config(config_path(tmp_path, 2, 64, "cpu"), config, "cpu")
    out = tmp_path / "regret.json"
    rows = regret.main(
        [str(path), "--sizes", "1,2,4", "--rounds", "2", "--samples", "2", "--json", str(out)]
    )
    assert json.loads(out.read_text()) == rows
    assert [r["batch_size"] for r in rows] == [1, 2, 4]
    by_size = {r["batch_size"]: r for r in rows}
    assert by_size[1]["chosen"] == "cpu_shm" and by_size[1]["is_key"]
    assert by_size[4]["chosen"] == "gloo" and by_size[4]["key"] == 3
    for row in rows:
        assert row["best"] in {"gloo", "cpu_shm"} and row["best_us"] > 0
        assert row["regret"] == pytest.approx(row["chosen_us"] / row["best_us"] - 1)
        assert row["regret"] >= 0
        # Without a file the CPU runtime uses gloo, as does the standard entry alone.
        assert row["no_file"]["runs"] == row["standard"]["runs"] == "gloo"
        assert row["no_file"]["speedup"] == pytest.approx(row["no_file"]["us"] / row["chosen_us"])
