"""Latency of the bare allreduce and of the server's fused job, per backend and batch size."""

import pytest

from pytest_allreduce import timing

pytestmark = pytest.mark.allreduce_suite("latency")


@pytest.mark.parametrize("job", ["allreduce", "fused"])
def test_latency(allreduce, job):
    session, case = allreduce.session, allreduce.case
    result = allreduce.run(timing.measure, case.batch_size, job, session.timing_plan)[0]
    latency = session.record_timing(case, job, result)
    assert all(s > 0 for s in latency.samples_us), "non-positive latency samples"
