"""Declared limits: the largest accepted input works, one step more is refused cleanly."""

import pytest

pytestmark = pytest.mark.allreduce_suite("limits")


def test_limits(allreduce_check):
    allreduce_check.run()
