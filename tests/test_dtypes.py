"""The numerics suite over every dtype on the CPU backends; the config comes from bfloat16."""

from __future__ import annotations

import json

import pytest

from pytest_allreduce.checktable import checks_of


def test_numerics_in_every_dtype_and_config_from_bfloat16(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "pytest_allreduce.suites.test_numerics",
        "pytest_allreduce.suites.test_latency",
        "--allreduce-dtypes=float32,float16,bfloat16",
        "--allreduce-batch-sizes=1,8",
        "--allreduce-max-tokens=8",
        "--allreduce-hidden-sizes=256",
        "--allreduce-output-dir=out",
        timeout=240,
    )
    # 2 backends x 3 dtypes x 4 sizes (1, 3, 8, 127) x the numerics checks; latency: one
    # test per dtype x size x job (both backends timed together).
    numerics = len(checks_of("numerics"))
    result.assert_outcomes(passed=2 * 3 * 4 * numerics + 3 * 2 * 2)
    for dtype in ("float32", "float16", "bfloat16"):
        report = (
            pytester.path
            / "out"
            / "tp2"
            / f"allreduce_report_hidden=256,dtype={dtype},device=cpu.md"
        )
        assert report.is_file()
    evidence = json.loads(
        (
            pytester.path / "out" / "tp2" / "allreduce_evidence_hidden=256,device=cpu.json"
        ).read_text()
    )
    assert set(evidence["dtypes"]) == {"float32", "float16", "bfloat16"}
    assert "bfloat16" in json.dumps(evidence["config"])
