"""The plan's tail past the largest batch size, up to --allreduce-max-tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_allreduce.options import Options
from pytest_allreduce.plan import Plan, geometric_tail, tail_end
from pytest_allreduce.registry import BackendRegistry


def test_the_tail_doubles_up_to_the_end() -> None:
    assert geometric_tail(504, 8192) == (1008, 2016, 4032, 8192)
    assert geometric_tail(512, 8192) == (1024, 2048, 4096, 8192)
    # A doubling that lands just below the end is dropped: the end is measured anyway.
    assert geometric_tail(8, 17) == (17,)
    assert geometric_tail(504, 504) == ()
    assert geometric_tail(1024, 512) == ()


@pytest.mark.parametrize(
    ("device", "world_size", "hidden", "dtype", "end"),
    [
        # On the CPU every entry runs gloo past cpu_shm's 16 MiB: nothing to decide above.
        ("cpu", 2, 4096, "bfloat16", 2049),
        ("cpu", 2, 65536, "float32", 65),
        # SGLang: the symmetric-memory kernel takes up to 64 MiB at 2 ranks (8191 rows).
        ("cuda", 2, 4096, "bfloat16", 8192),
        ("cuda", 2, 7168, "bfloat16", 4682),
        # float32: neither symmetric memory nor the fusion; custom allreduce stops at 511.
        ("cuda", 4, 4096, "float32", 512),
    ],
)
def test_the_tail_ends_where_no_choice_changes_what_runs(
    device: str, world_size: int, hidden: int, dtype: str, end: int
) -> None:
    assert tail_end(device, (world_size,), (hidden,), (dtype,), 8192) == end
    assert tail_end(device, (world_size,), (hidden,), (dtype,), 100) == min(end, 100)


def _options(**overrides: object) -> Options:
    values: dict[str, object] = {
        "backends": ("gloo",),
        "device": "cpu",
        "world_sizes": (2,),
        "hidden_sizes": (4096,),
        "batch_sizes": (1, 2, 32),
        "dtypes": ("bfloat16",),
        "output_dir": Path("unused"),
        "timeout_s": 10.0,
        "baseline": None,
        "save_baseline": None,
    }
    values.update(overrides)
    return Options(**values)  # type: ignore[arg-type]


def test_the_plan_is_the_sizes_asked_for_then_the_tail() -> None:
    registry = BackendRegistry()
    registry.load_builtins()
    plan = Plan.build(_options(max_tokens=8192), registry)
    assert plan.batch_sizes == (1, 2, 32, 64, 128, 256, 512, 1024, 2049)
    assert plan.max_tokens == 8192
    assert Plan.build(_options(max_tokens=32), registry).batch_sizes == (1, 2, 32)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "positive integer"),
        ("-8", "positive integer"),
        ("abc", "not an integer"),
        ("70000", "above the largest allowed value, 65536"),
    ],
)
def test_bad_max_tokens_is_a_usage_error(
    pytester: pytest.Pytester, value: str, problem: str
) -> None:
    result = pytester.runpytest("--allreduce-max-tokens=" + value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--allreduce-max-tokens=*{value}*{problem}*"])


def test_max_tokens_from_the_ini_file_extends_the_plan(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nallreduce_max_tokens = 32\n")
    result = pytester.runpytest(
        "--pyargs",
        "pytest_allreduce.suites.test_latency",
        "--allreduce-backends=gloo",
        "--allreduce-batch-sizes=1,8",
        "--collect-only",
        "-q",
    )
    ids = result.stdout.str()
    assert "bs16" in ids and "bs32" in ids and "bs64" not in ids, ids
