"""Numerical equivalence: is every backend's sum right, on every rank, at every size?"""

import pytest

from pytest_allreduce import checks

pytestmark = [
    pytest.mark.allreduce_suite("numerics"),
    pytest.mark.allreduce_extra_batch_sizes(1, 3, 127),
]


def test_exact_sum(allreduce):
    """Integer inputs: bit-for-bit equal to the exact sum, unwritten outputs caught."""
    checks.assert_ranks_ok(allreduce.run(checks.exact_sum, allreduce.case.batch_size))


def test_random_sum(allreduce):
    """Normal inputs: within the stated per-dtype bound of a float64 reference."""
    checks.assert_ranks_ok(allreduce.run(checks.random_sum, allreduce.case.batch_size))


def test_fused_job(allreduce):
    """allreduce + residual add + RMSNorm: output and residual-out against the reference."""
    checks.assert_ranks_ok(allreduce.run(checks.fused_job, allreduce.case.batch_size))
