"""Job buffers from NCCL's own allocator, for timing comparisons with nccl-tests.

nccl-tests 2.19 allocates its buffers with ncclMemAlloc (cuMem-backed memory) where the
plugin, like a server, takes them from torch's caching allocator. On 2 x H200 (NCCL 2.28.9)
ncclAllReduce on ncclMemAlloc buffers took 230 us at 64 MiB against 244 us on torch's
(docs/results/h200x2-nccl-tests.md), so a like-for-like comparison needs the same memory:
TimingPlan memory=ncclmem.

The buffers of one timing call are freed when it ends, so this is for backends that keep
no address of a job buffer past a call (pynccl, nccl), not for those that register their
graphs' buffers with their peers.
"""

from __future__ import annotations

import torch


class _DeviceArray:
    """A raw device allocation as torch sees one without a copy (__cuda_array_interface__)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


class NcclMemory:
    """Tensors on `device` whose memory comes from ncclMemAlloc; free() returns it all."""

    def __init__(self, device: torch.device) -> None:
        from .backends.pynccl import nccl_library

        self.device = device
        self.lib = nccl_library()
        self.pointers: list[int] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = 1
        for n in shape:
            count *= n
        nbytes = max(1, count * dtype.itemsize)
        with torch.cuda.device(self.device):
            ptr = self.lib.mem_alloc(nbytes)
        self.pointers.append(ptr)
        raw = torch.as_tensor(_DeviceArray(ptr, nbytes), device=self.device)
        return raw[: count * dtype.itemsize].view(dtype).view(shape)

    def free(self) -> None:
        torch.cuda.synchronize(self.device)
        with torch.cuda.device(self.device):
            for ptr in self.pointers:
                self.lib.mem_free(ptr)
        self.pointers.clear()
