"""Declared limits: the largest accepted input works, one step more is refused cleanly."""

import pytest

from pytest_allreduce import checks

pytestmark = pytest.mark.allreduce_suite("limits")


def test_size_limits(allreduce_session, allreduce_target):
    variant = allreduce_session.plan.variant(allreduce_target.backend)
    limits = variant.cls.limits(variant.variant, allreduce_target.world_size)
    largest = limits.largest_rows(allreduce_target.hidden, allreduce_target.dtype)
    if largest is None and limits.min_rows <= 1:
        pytest.skip(f"{allreduce_target.backend} declares no size limit")
    runner_case = allreduce_target.at(largest or limits.min_rows)
    work = allreduce_session.require(runner_case)
    reports = allreduce_session.run(allreduce_target.world_size, checks.size_limits, work)
    checks.assert_ranks_ok(reports)
