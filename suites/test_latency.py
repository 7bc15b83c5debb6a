"""Latency of the bare allreduce and of the server's fused job: at each size, every runnable
backend timed together (interleaved rounds, see `pytest_allreduce.timing`), its last outputs
checked against the exact sum. A backend that fails fails the test under its own name.

`allreduce_benchmark` makes these tests pytest-benchmark's benchmarks when it is installed
(`--benchmark-only` runs them, `--benchmark-skip` skips them); the records it reports are
the plugin's own timings, handed over at session end.
"""

import pytest

pytestmark = [
    pytest.mark.allreduce_suite("latency"),
    pytest.mark.usefixtures("allreduce_benchmark"),
]


@pytest.mark.parametrize("job", ["allreduce", "fused"])
def test_latency(allreduce_latency, job):
    allreduce_latency.measure(job)
