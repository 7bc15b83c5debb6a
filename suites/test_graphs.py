"""CUDA-graph capture the way servers capture decode sizes: many replays, inputs changed in
place between them, every replay checked."""

import math

import pytest

from pytest_allreduce import checks
from pytest_allreduce.session import GRAPH_REPLAYS

pytestmark = pytest.mark.allreduce_suite("graph")

# Replays per test: the suite gives every backend at least GRAPH_REPLAYS replays per graph
# pair over the plan's sizes, and never fewer than this at any one size.
MIN_REPLAYS_PER_SIZE = 50


def test_graph_replays(allreduce):
    session, case = allreduce.session, allreduce.case
    if session.plan.device != "cuda":
        pytest.skip("CUDA graphs need a GPU; this session runs on the CPU")
    variant = allreduce.work.variant
    limits = variant.cls.limits(variant.variant, case.target.world_size)
    if not limits.graph_capturable:
        pytest.skip(f"{case.target.backend} declares it cannot be captured in a CUDA graph")
    # The case's size plus the smallest size it accepts: two graphs alive at once, as in a
    # server that captured several batch sizes.
    sizes = sorted({case.batch_size, limits.min_rows})
    replays = max(MIN_REPLAYS_PER_SIZE, math.ceil(GRAPH_REPLAYS / len(session.plan.batch_sizes)))
    checks.assert_ranks_ok(allreduce.run(checks.graph_replays, sizes, replays))
