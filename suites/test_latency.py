"""Latency of the bare allreduce and of the server's fused job: at each size, every runnable
backend timed together (interleaved rounds, see `pytest_allreduce.timing`), its last outputs
checked against the exact sum. A backend that fails fails the test under its own name."""

import pytest

pytestmark = pytest.mark.allreduce_suite("latency")


@pytest.mark.parametrize("job", ["allreduce", "fused"])
def test_latency(allreduce_latency, job):
    allreduce_latency.measure(job)
