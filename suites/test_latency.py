"""Latency of the bare allreduce and of the server's fused job, per backend and batch size."""

import pytest

pytestmark = pytest.mark.allreduce_suite("latency")


@pytest.mark.parametrize("job", ["allreduce", "fused"])
def test_latency(allreduce, job):
    samples = allreduce.measure(job)
    assert all(s > 0 for s in samples), "non-positive latency samples"
