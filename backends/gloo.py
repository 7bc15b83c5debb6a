"""gloo: torch.distributed's CPU collective, the safe default on the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_allreduce.backend import Backend, Limits, VariantSpec

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext


class GlooBackend(Backend):
    name = "gloo"
    variants = (VariantSpec(server_type="gloo", summary="torch.distributed all_reduce (gloo)"),)
    simplicity = 0

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(device="cpu", dtypes=("float32", "float16", "bfloat16"))

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        import torch.distributed as dist

        if not dist.is_gloo_available():
            return "torch was built without gloo"
        return None

    def setup(self) -> None:
        pass

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        import torch.distributed as dist

        out.copy_(inp)
        dist.all_reduce(out, group=self.ctx.cpu_group)
