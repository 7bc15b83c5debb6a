"""Numerical equivalence: is every backend's sum right, on every rank, at every size?

The checks are the numerics entries of `pytest_allreduce.checktable.CHECKS`: exact integer
sums bit for bit, random inputs against a float64 reference, and the fused job."""

import pytest

pytestmark = pytest.mark.allreduce_suite("numerics")


def test_numerics(allreduce_check):
    allreduce_check.run()
