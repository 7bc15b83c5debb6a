"""sgl-kernel's custom allreduce: what a server's `custom_allreduce` config type loads.

The kernels come from `sgl_kernel.allreduce` (its CUDA build); the IPC buffers and the
capture protocol are `_cuda_ipc.CustomAllReduceBase`.
"""

from __future__ import annotations

from pytest_allreduce.backend import VariantSpec

from ._cuda_ipc import CustomAllReduceBase


class CustomArBackend(CustomAllReduceBase):
    name = "custom_ar"
    variants = (VariantSpec(server_type="custom_allreduce", summary="sgl-kernel custom allreduce"),)
    library_module = "sgl_kernel.allreduce"
    package = "sgl-kernel"
    distribution = "sglang-kernel"
