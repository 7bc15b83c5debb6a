"""FlashInfer MixedComm's allreduce (run_mixed_comm(ALLREDUCE, handler, x)).

MixedCommHandler always creates NVLink multicast objects (even for its unicast modes),
initialises NVSHMEM and builds its own process groups over the default (WORLD) group. So:
needs_multicast is always True (the engine never sets it up where multicast is off, and the
probe and set-up refuse too), the probe checks for the nvidia-nvshmem package, and the rank
group must be the whole default group. fp16/bf16, SM90/SM100. Its autotune picks a mode
(fused kernels or NCCL) per op at set-up; CUDA-graph capture is not documented, so it is
declared not capturable. No server config type names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_allreduce.backend import Backend, Limits, VariantSpec

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

MAJORS: tuple[int, ...] = (9, 10)


def _mixed() -> Any:
    import flashinfer.comm.mixed_comm  # type: ignore[import-not-found]

    return flashinfer.comm.mixed_comm


class MixedCommBackend(Backend):
    name = "mixed_comm"
    variants = (VariantSpec(summary="flashinfer MixedComm ALLREDUCE"),)
    simplicity = 70

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(
            device="cuda",
            dtypes=("float16", "bfloat16"),
            world_sizes=None,
            hidden_multiple=8,  # 16-byte accesses
            graph_capturable=False,
            needs_multicast=True,
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if reason := _gpu.multicast_refusal(ctx):
            return reason
        if reason := _gpu.major_refusal(ctx, MAJORS, "MixedComm"):
            return reason
        if ctx.local_world_size < 2:
            return "needs at least 2 ranks per node"
        if ctx.world_size % ctx.local_world_size:
            return "needs the same number of ranks on every node"
        if not _gpu.installed("nvidia.nvshmem"):
            return "nvidia-nvshmem not installed"
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() != ctx.world_size:
            return "MixedComm works over the whole default process group only"
        if reason := _gpu.module_refusal("flashinfer.comm.mixed_comm", "flashinfer"):
            return reason
        if not hasattr(_mixed(), "MixedCommHandler"):
            return "this flashinfer has no MixedCommHandler"
        return None

    def setup(self) -> None:
        import torch

        if not self.ctx.multicast_allowed:
            raise RuntimeError("mixed_comm set up while multicast is off")
        mixed = _mixed()
        ctx = self.ctx
        nodes = ctx.world_size // ctx.local_world_size
        self.mixed = mixed
        self.handler: Any = None
        with torch.cuda.device(ctx.device):
            self.handler = mixed.MixedCommHandler(
                ctx.rank,
                ctx.world_size,
                ctx.local_rank,
                ctx.local_world_size,
                ctx.rank // ctx.local_world_size,
                nodes,
                None,  # all TP, no DP (the defaults)
                None,
                None,
                None,
                self.dtype,
                ctx.device,
            )
        self._op = mixed.MixedCommOp.ALLREDUCE

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.mixed.run_mixed_comm(self._op, self.handler, inp, out)

    def engaged(self) -> str:
        return "flashinfer MixedComm ALLREDUCE (autotuned mode per size)"

    def release(self) -> None:
        handler, self.handler = getattr(self, "handler", None), None
        if handler is not None:
            handler.shutdown()
