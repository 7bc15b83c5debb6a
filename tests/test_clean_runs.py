"""Correct backends raise no false alarm: every check of the table on gloo and cpu_shm, at two
world sizes (bit for bit at 2, the derived bound at 3) and in every dtype. The 20-run figure
comes from benchmarks/clean_runs.py; this is one run of the same kind, kept small."""

from __future__ import annotations

import re

import pytest

from pytest_allreduce.checktable import CHECKS


def test_clean_backends_pass_every_check_in_every_dtype(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-rfE",
        "-v",
        "--pyargs",
        "pytest_allreduce.suites",
        "--allreduce-backends=gloo,cpu_shm",
        "--allreduce-world-sizes=2,3",
        "--allreduce-dtypes=bfloat16,float16,float32",
        "--allreduce-batch-sizes=1",
        "--allreduce-max-tokens=1",
        "--allreduce-hidden-sizes=128",
        "--allreduce-output-dir=out",
        timeout=900,
    )
    output = result.stdout.str()
    assert result.ret == 0, output
    assert "FAILED" not in output and "kept out of the config" not in output
    passed = set(
        re.findall(r"::test_\w+\[(\w+)-(gloo|cpu_shm)-tp(\d)-h128-(\w+)-bs\d+\] PASSED", output)
    )
    # Every check of the table that runs on the CPU passed for both backends, both world
    # sizes and every dtype (the graph suite needs CUDA).
    for check in CHECKS:
        if check.needs_graphs:
            continue
        # Only cpu_shm declares a largest input for the limits check to step around.
        for backend in ("cpu_shm",) if check.sizes == "limits" else ("gloo", "cpu_shm"):
            for ws in ("2", "3"):
                for dtype in ("bfloat16", "float16", "float32"):
                    assert (check.name, backend, ws, dtype) in passed, (check.name, backend, ws)
