"""FlashInfer's port of vLLM's custom allreduce (`flashinfer.comm.vllm_*`).

No server type on purpose: a server config's `custom_allreduce` type makes the server load
sgl-kernel's custom allreduce (the `custom_ar` backend), not this port, so a win here must
not be written into a config as `custom_allreduce`.

The same IPC buffers and capture protocol as `custom_ar`; the kernel takes an explicit CTA
count (at most 36). First use JIT-builds FlashInfer's `vllm_comm` module (the devkit ships
it compiled for SM90).
"""

from __future__ import annotations

from pytest_allreduce.backend import VariantSpec

from ._cuda_ipc import CustomAllReduceBase

NUM_CTAS = 36  # the kernel refuses more; servers use the maximum


class VllmCustomArBackend(CustomAllReduceBase):
    name = "vllm_custom_ar"
    variants = (VariantSpec(summary=f"FlashInfer vllm custom allreduce, {NUM_CTAS} CTAs"),)
    simplicity = 35
    library_module = "flashinfer.comm"
    package = "flashinfer"
    distribution = "flashinfer-python"
    prefix = "vllm_"
    kernel_extra_args = (NUM_CTAS,)
    min_capability = (7, 5)  # FlashInfer's vllm_comm JIT target floor
