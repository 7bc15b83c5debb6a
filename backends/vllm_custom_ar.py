"""FlashInfer's port of vLLM's custom allreduce (`flashinfer.comm.vllm_*`).

backend_type is None on purpose: a server config's `custom_allreduce` type makes the server
load sgl-kernel's custom allreduce (the `custom_ar` backend), not this port, so a win here
must not be written into a config as `custom_allreduce`.

Same IPC buffers and capture protocol as `custom_ar` (`_cuda_ipc.CustomAllReduceBase`); the
kernel takes an explicit CTA count (at most 36). First use JIT-builds FlashInfer's
`vllm_comm` module (the devkit ships it compiled for SM90).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from pytest_allreduce.context import RankContext

from . import _gpu
from ._cuda_ipc import CustomAllReduceBase

NUM_CTAS = 36  # the kernel refuses more; servers use the maximum
MIN_CAPABILITY = (7, 5)  # FlashInfer's vllm_comm JIT target floor

_REQUIRED = (
    "vllm_init_custom_ar",
    "vllm_register_buffer",
    "vllm_all_reduce",
    "vllm_get_graph_buffer_ipc_meta",
    "vllm_register_graph_buffers",
    "vllm_dispose",
    "vllm_meta_size",
)


def _comm() -> Any:
    import flashinfer.comm  # type: ignore[import-not-found]

    return flashinfer.comm


class VllmCustomArBackend(CustomAllReduceBase):
    name = "vllm_custom_ar"
    backend_type: ClassVar[str | None] = None  # see the module docstring
    simplicity = 35
    label: ClassVar[str] = "FlashInfer vllm custom allreduce"

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if reason := _gpu.one_node_refusal(ctx):
            return reason
        if reason := _gpu.min_capability_refusal(ctx, MIN_CAPABILITY):
            return reason
        if reason := _gpu.module_refusal("flashinfer.comm", "flashinfer"):
            return reason
        comm = _comm()
        missing = [fn for fn in _REQUIRED if not hasattr(comm, fn)]
        if missing:
            return f"flashinfer lacks {', '.join(missing)}"
        if reason := _gpu.full_nvlink_refusal(ctx):
            return reason
        return _gpu.peer_access_refusal(ctx)

    def setup(self) -> None:
        self.lib = _comm()
        super().setup()

    def _meta_size(self) -> int:
        return int(self.lib.vllm_meta_size())

    def _init(self, meta_ptrs: list[int], rank_data: torch.Tensor, full_nvlink: bool) -> int:
        return int(self.lib.vllm_init_custom_ar(meta_ptrs, rank_data, self.ctx.rank, full_nvlink))

    def _register(self, ptrs: list[int]) -> None:
        self.lib.vllm_register_buffer(self.fa, ptrs)

    def _kernel(self, inp: torch.Tensor, out: torch.Tensor, reg_ptr: int, reg_bytes: int) -> None:
        self.lib.vllm_all_reduce(self.fa, inp, out, reg_ptr, reg_bytes, NUM_CTAS)

    def _graph_meta(self) -> tuple[list[int], list[int]]:
        handles, offsets = self.lib.vllm_get_graph_buffer_ipc_meta(self.fa)
        return list(handles), list(offsets)

    def _register_graph(self, handles: list[list[int]], offsets: list[list[int]]) -> None:
        self.lib.vllm_register_graph_buffers(self.fa, handles, offsets)

    def _dispose(self) -> None:
        self.lib.vllm_dispose(self.fa)

    def engaged(self) -> str:
        return (
            f"{super().engaged()}; {NUM_CTAS} CTAs; "
            f"flashinfer {_gpu.package_version('flashinfer-python')}"
        )
