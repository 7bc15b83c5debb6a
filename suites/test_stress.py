"""Stress: thousands of back-to-back calls per backend, inputs changing before every call and
every output checked on the device, eagerly and as CUDA-graph replays: the entries of the
"stress" suite in `pytest_allreduce.checktable.CHECKS`."""

import pytest

pytestmark = pytest.mark.allreduce_suite("stress")


def test_stress(allreduce_check):
    allreduce_check.run()
