"""Numerical equivalence: is every backend's sum right, on every rank, at every size?

The checks are the numerics entries of `pytest_allreduce.checktable.CHECKS`: exact integer
sums, correctly rounded sums of mixed inputs, the edges of the dtype (overflow, subnormals,
signed zeros, NaN, Inf), and the fused job on small rows with several epsilons."""

import pytest

pytestmark = pytest.mark.allreduce_suite("numerics")


def test_numerics(allreduce_check):
    allreduce_check.run()
