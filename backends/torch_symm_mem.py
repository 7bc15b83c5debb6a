"""torch symmetric memory all-reduce ops (torch.ops.symm_mem.*), as SGLang's torch_symm_mem.

Set-up allocates one symmetric buffer for the largest input and rendezvouses it over the
rank group (collective, outside any capture). Each call copies the input into a view of that
buffer, runs the variant's op, and leaves the sum in `out`:

- one_shot: one_shot_all_reduce_out(view -> out): every rank reads every peer's buffer.
- two_shot: two_shot_all_reduce_(view) in place, then copy to out. The in-place op takes any
  world size; two_shot_all_reduce_out would take only 2/4/8 and also overwrite its input.
- multimem: multimem_all_reduce_(view) in place over an NVLink multicast address, then copy.
  Needs multicast, so the engine skips it (never calls it) wherever multicast is off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_allreduce.backend import Backend, Limits, VariantSpec

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

MiB = _gpu.MiB

# Largest message per rank SGLang lets torch_symm_mem take, by world size.
MAX_BYTES: dict[int, int] = {2: 64 * MiB, 4: 64 * MiB, 6: 128 * MiB, 8: 128 * MiB}
WORLD_SIZES: tuple[int, ...] = (2, 4, 6, 8)
# The ops verify offset and size alignment to max(4, element size) bytes.
ALIGNMENT_BYTES = 4
MIN_CAPABILITY = (9, 0)  # the servers' gate (torch's kernels themselves build from SM80)

_OPS: dict[str, str] = {
    "one_shot": "one_shot_all_reduce_out",
    "two_shot": "two_shot_all_reduce_",
    "multimem": "multimem_all_reduce_",
}


class TorchSymmMemBackend(Backend):
    name = "torch_symm_mem"
    # SGLang's communicator runs two-shot or multimem (by world size and capability), never
    # one-shot: no config entry makes a server run one_shot, so it has no server type.
    variants = tuple(
        VariantSpec(
            suffix,
            server_type=None if suffix == "one_shot" else "torch_symm_mem",
            summary=f"torch.ops.symm_mem.{op} (copy-in to the symmetric buffer)",
        )
        for suffix, op in _OPS.items()
    )
    simplicity = 20

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(
            device="cuda",
            dtypes=("float32", "bfloat16"),
            world_sizes=WORLD_SIZES,
            max_bytes=MAX_BYTES.get(world_size, MAX_BYTES[2]),
            alignment_bytes=ALIGNMENT_BYTES,
            graph_capturable=True,
            needs_multicast=variant == "multimem",
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if variant == "multimem" and (reason := _gpu.multicast_refusal(ctx)):
            return reason
        if reason := _gpu.min_capability_refusal(ctx, MIN_CAPABILITY):
            return reason
        import torch

        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError:
            return "this torch has no torch.distributed._symmetric_memory"
        if not hasattr(symm_mem, "rendezvous") or not hasattr(symm_mem, "empty"):
            return "this torch's symmetric memory lacks empty/rendezvous"
        if not hasattr(torch.ops.symm_mem, _OPS[variant]):
            return f"this torch has no torch.ops.symm_mem.{_OPS[variant]}"
        return None

    def setup(self) -> None:
        import torch
        import torch.distributed._symmetric_memory as symm_mem

        if self.variant == "multimem" and not self.ctx.multicast_allowed:
            raise RuntimeError("torch_symm_mem_multimem set up while multicast is off")
        numel = self.max_rows * self.hidden
        self.group_name: str = self.ctx.group.group_name
        with torch.cuda.device(self.ctx.device):
            self.buffer = symm_mem.empty(numel, dtype=self.dtype, device=self.ctx.device)
            # Collective over the rank group.
            self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        if self.variant == "multimem" and not getattr(self.handle, "multicast_ptr", 0):
            raise RuntimeError("symmetric memory came without a multicast address")
        self._op = getattr(torch.ops.symm_mem, _OPS[self.variant])

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        view = self.buffer[: inp.numel()]
        view.copy_(inp.view(-1))
        if self.variant == "one_shot":
            self._op(view, "sum", self.group_name, out.view(-1))
        else:
            self._op(view, "sum", self.group_name)
            out.view(-1).copy_(view)

    def release(self) -> None:
        self.handle = None
        self.buffer = None
