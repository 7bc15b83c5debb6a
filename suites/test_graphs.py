"""CUDA-graph capture the way servers capture decode sizes: many replays, inputs changed in
place between them, every replay checked."""

import pytest

pytestmark = pytest.mark.allreduce_suite("graph")


def test_graphs(allreduce_check):
    allreduce_check.run()
