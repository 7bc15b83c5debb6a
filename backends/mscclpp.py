"""MSCCL++ one-shot LL allreduce from sgl-kernel 0.3.x (`sgl_kernel.allreduce.mscclpp_*`).

Only sgl-kernel 0.3.x ships these functions (sglang-kernel 0.4+ removed them); the probe says
so otherwise. No server config type names it.

As servers use it: world size 8 (one node) or 16 (two nodes of 8), messages up to 1 MiB,
inside CUDA graphs only. Eager calls work but rebuild the memory channels for every new
input pointer and synchronise a side stream each time, so eager timings are not what a
server sees. The LL kernel splits the message into world-size slices of 8-byte packets with
integer division, so sizes must be multiples of 8 x world size (otherwise the tail is
silently left unreduced).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_allreduce.backend import Backend, Limits, VariantSpec

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

MAX_BYTES = 1 << 20
WORLD_SIZES: tuple[int, ...] = (8, 16)
RANKS_PER_NODE = 8
SCRATCH_FACTOR = 8  # the LL scratch holds about 8x the message (double-buffered packets)
NTHREADS = 512
# Blocks are split evenly over the peers of a node: a multiple of RANKS_PER_NODE - 1.
NBLOCKS = 21
SINGLE_NODE, TWO_NODES = 1, 2  # mscclpp_init_context's context selection


def _ops() -> Any:
    import sgl_kernel.allreduce  # type: ignore[import-not-found]

    return sgl_kernel.allreduce


class MscclppBackend(Backend):
    name = "mscclpp"
    variants = (VariantSpec(summary="sgl-kernel mscclpp one-shot LL"),)
    simplicity = 60

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(
            device="cuda",
            dtypes=("float32", "float16", "bfloat16"),
            world_sizes=WORLD_SIZES,
            max_bytes=MAX_BYTES,
            alignment_bytes=8 * max(world_size, 1),
            graph_capturable=True,
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if reason := _gpu.module_refusal("sgl_kernel.allreduce", "sgl-kernel"):
            return reason
        ops = _ops()
        if not all(
            hasattr(ops, fn)
            for fn in ("mscclpp_generate_unique_id", "mscclpp_init_context", "mscclpp_allreduce")
        ):
            version = _gpu.package_version("sglang-kernel")
            if version == "unknown":
                version = _gpu.package_version("sgl-kernel")
            return f"sgl-kernel {version} has no mscclpp (only sgl-kernel 0.3.x ships it)"
        if ctx.local_world_size != RANKS_PER_NODE:
            return f"needs {RANKS_PER_NODE} ranks per node, have {ctx.local_world_size}"
        return None

    def setup(self) -> None:
        import torch

        ops = _ops()
        self.ops = ops
        ctx = self.ctx
        uid = ops.mscclpp_generate_unique_id() if ctx.rank == 0 else None
        uid = ctx.all_gather_object(uid)[0]
        per_node = ctx.local_world_size
        selection = SINGLE_NODE if ctx.world_size == per_node else TWO_NODES
        with torch.cuda.device(ctx.device):
            self.scratch = torch.empty(
                MAX_BYTES * SCRATCH_FACTOR, dtype=torch.uint8, device=ctx.device
            )
            self.put_buffer = torch.empty(
                MAX_BYTES * SCRATCH_FACTOR // per_node, dtype=torch.uint8, device=ctx.device
            )
            self.context = ops.mscclpp_init_context(
                uid,
                ctx.rank,
                ctx.world_size,
                self.scratch,
                self.put_buffer,
                per_node,
                [r // per_node for r in range(ctx.world_size)],  # rank -> node
                [r % per_node for r in range(ctx.world_size)],  # rank -> IB device index
                selection,
            )
        self.selection = selection
        ctx.barrier()

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.ops.mscclpp_allreduce(self.context, inp, out, NTHREADS, NBLOCKS)

    def engaged(self) -> str:
        nodes = "1 node" if self.selection == SINGLE_NODE else "2 nodes"
        return f"sgl-kernel mscclpp one-shot LL ({nodes}, {NTHREADS} threads x {NBLOCKS} blocks)"

    def release(self) -> None:
        # sgl-kernel exposes no destroy for the context; dropping the buffers is all we can do.
        self.context = None
        self.scratch = None
        self.put_buffer = None
