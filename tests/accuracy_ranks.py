"""Rank-side helpers of the accuracy tests: reducers with planted faults.

A separate module (not a test file) because the pool's spawned ranks unpickle these by
importing their module; tests/ is on the ranks' sys.path as it is on pytest's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pytest_allreduce.accuracy.reducers import ReduceAddNorm, TorchReducer
from pytest_allreduce.context import RankContext


class DropShareReducer(TorchReducer):
    """Loses rank 1's share of one row in 64 (rows 0, 64, 128, ...) of every reduce: a
    backend that reads a stale or partial row."""

    def __init__(self, ctx: RankContext) -> None:
        super().__init__(ctx)
        self.rank = ctx.rank

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            partial[::64] = 0
        dist.all_reduce(partial, group=self.group)
        return partial


class UlpReducer(TorchReducer):
    """Every sum one ulp too large: a backend that rounds differently, nothing worse."""

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, group=self.group)
        return torch.nextafter(partial, torch.full_like(partial, float("inf")))


def drop_share_reducer(ctx: RankContext) -> ReduceAddNorm:
    return DropShareReducer(ctx)


def ulp_reducer(ctx: RankContext) -> ReduceAddNorm:
    return UlpReducer(ctx)
