"""NCCL through torch.distributed: the safe default every other backend is compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_allreduce.backend import Backend, Limits, VariantSpec

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext


class NcclBackend(Backend):
    name = "nccl"
    variants = (
        VariantSpec(
            server_type="nccl",
            summary="torch.distributed all_reduce (NCCL, in place on a copy)",
        ),
    )
    simplicity = 0

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(
            device="cuda",
            dtypes=("float32", "float16", "bfloat16"),
            world_sizes=None,
            graph_capturable=True,
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        import torch.distributed as dist

        if reason := _gpu.cuda_refusal(ctx, rocm_ok=True):
            return reason
        if not dist.is_nccl_available():
            return "torch was built without NCCL"
        if ctx.group is not None and dist.get_backend(ctx.group) != "nccl":
            return f"the rank group uses {dist.get_backend(ctx.group)}, not nccl"
        return None

    def setup(self) -> None:
        import torch
        import torch.distributed as dist

        # One collective outside any capture, so NCCL's communicator exists before a graph
        # is captured (it is created lazily at the first collective otherwise).
        with torch.cuda.device(self.ctx.device):
            warm = torch.zeros(1, dtype=self.dtype, device=self.ctx.device)
            dist.all_reduce(warm, group=self.ctx.group)
            torch.cuda.synchronize(self.ctx.device)

    def engaged(self) -> str:
        from .pynccl import graph_mixing

        return f"{self.spec.summary} ({graph_mixing()})"

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        import torch.distributed as dist

        out.copy_(inp)
        dist.all_reduce(out, group=self.ctx.group)
