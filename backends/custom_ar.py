"""sgl-kernel's custom allreduce (what a server's `custom_allreduce` config type loads).

The kernels come from `sgl_kernel.allreduce` (CUDA branch): init_custom_ar, register_buffer,
all_reduce(fa, inp, out, reg_buffer, reg_bytes), get_graph_buffer_ipc_meta,
register_graph_buffers, dispose, meta_size. The IPC buffers and the capture protocol live
in `_cuda_ipc.CustomAllReduceBase`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from pytest_allreduce.context import RankContext

from . import _gpu
from ._cuda_ipc import CustomAllReduceBase

_REQUIRED = (
    "init_custom_ar",
    "register_buffer",
    "all_reduce",
    "get_graph_buffer_ipc_meta",
    "register_graph_buffers",
    "dispose",
    "meta_size",
)


def _ops() -> Any:
    import sgl_kernel.allreduce  # type: ignore[import-not-found]

    return sgl_kernel.allreduce


class CustomArBackend(CustomAllReduceBase):
    name = "custom_ar"
    backend_type: ClassVar[str | None] = "custom_allreduce"
    label: ClassVar[str] = "sgl-kernel custom allreduce"

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if reason := _gpu.one_node_refusal(ctx):
            return reason
        if reason := _gpu.module_refusal("sgl_kernel.allreduce", "sgl-kernel"):
            return reason
        ops = _ops()
        missing = [fn for fn in _REQUIRED if not hasattr(ops, fn)]
        if missing:
            return f"sgl-kernel lacks {', '.join(missing)}"
        if reason := _gpu.full_nvlink_refusal(ctx):
            return reason
        return _gpu.peer_access_refusal(ctx)

    def setup(self) -> None:
        self.lib = _ops()
        super().setup()

    def _meta_size(self) -> int:
        return int(self.lib.meta_size())

    def _init(self, meta_ptrs: list[int], rank_data: torch.Tensor, full_nvlink: bool) -> int:
        return int(self.lib.init_custom_ar(meta_ptrs, rank_data, self.ctx.rank, full_nvlink))

    def _register(self, ptrs: list[int]) -> None:
        self.lib.register_buffer(self.fa, ptrs)

    def _kernel(self, inp: torch.Tensor, out: torch.Tensor, reg_ptr: int, reg_bytes: int) -> None:
        self.lib.all_reduce(self.fa, inp, out, reg_ptr, reg_bytes)

    def _graph_meta(self) -> tuple[list[int], list[int]]:
        handles, offsets = self.lib.get_graph_buffer_ipc_meta(self.fa)
        return list(handles), list(offsets)

    def _register_graph(self, handles: list[list[int]], offsets: list[list[int]]) -> None:
        self.lib.register_graph_buffers(self.fa, handles, offsets)

    def _dispose(self) -> None:
        self.lib.dispose(self.fa)

    def engaged(self) -> str:
        return f"{super().engaged()}; sgl-kernel {_gpu.package_version('sglang-kernel')}"
