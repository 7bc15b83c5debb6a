"""Latency of the bare allreduce and of the server's fused job, per backend and batch size.

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
def test_latency(allreduce, job):
    samples = allreduce.measure(job)
    assert all(s > 0 for s in samples), "non-positive latency samples"
