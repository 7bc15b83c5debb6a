"""What the model calls for each row-parallel reduce, and the reference implementation.

A reducer performs a server's whole step after o_proj or down_proj: the allreduce of the
rank's partial output, the residual add, and the next RMSNorm. A backend that fuses the three
runs them as one kernel; others allreduce and then run the engine's add + RMSNorm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from ..context import RankContext


class ReduceAddNorm(Protocol):
    def __call__(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, residual_out): residual_out = allreduce(partial) + residual and
        normed = RMSNorm(residual_out) * weight. `partial` and `residual` are 2-D and
        contiguous; the model never reads them again, so a reducer may overwrite them."""
        ...

    def capture(self) -> contextlib.AbstractContextManager[None]:
        """Entered around each CUDA-graph capture of the decode step."""
        ...

    def after_capture(self) -> int:
        """Called on every rank after each capture; how many graph buffers it registered."""
        ...


ReducerFactory = Callable[["RankContext"], ReduceAddNorm]


class TorchReducer:
    """The reference: torch.distributed's all_reduce on the rank's device group (NCCL on
    CUDA, gloo on the CPU), then the engine's add + RMSNorm composition."""

    def __init__(self, ctx: RankContext) -> None:
        from ..jobs import add_rms_norm

        self.group = ctx.group
        self.add_rms_norm = add_rms_norm(ctx.device)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(partial, group=self.group)
        return partial

    def __call__(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        summed = self.reduce(partial)
        # In place, as the engine's composition works: residual += summed; summed = norm.
        self.add_rms_norm.fn(summed, residual, weight, eps)
        return summed, residual

    def capture(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def after_capture(self) -> int:
        return 0


def torch_reducer(ctx: RankContext) -> ReduceAddNorm:
    """A ReducerFactory for the reference reducer."""
    return TorchReducer(ctx)
