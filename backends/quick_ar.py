"""Quick allreduce (ROCm MI300-class only) through sgl-kernel's ROCm `qr_*` ops.

On CUDA the probe answers "ROCm only". On ROCm it needs a gfx94x/gfx95x GPU, sgl-kernel's
ROCm build with init_custom_qr/qr_*, and ROCM_QUICK_REDUCE_QUANTIZATION set to FP, INT8,
INT6 or INT4 (servers keep it off otherwise). The INT levels are lossy: their results are
expected to differ from an exact sum. Optional ROCM_QUICK_REDUCE_CAST_BF16_TO_FP16 (default
on) runs bf16 inputs through the fp16 kernels. No server config type names it.

Servers also skip it below per-(dtype, world size, level) minimum sizes (it is slower than
custom allreduce there); Limits has no minimum size, so small sizes are measured too.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pytest_allreduce.backend import Backend, Limits, VariantSpec

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

QUANT_ENV = "ROCM_QUICK_REDUCE_QUANTIZATION"
CAST_ENV = "ROCM_QUICK_REDUCE_CAST_BF16_TO_FP16"
QUANT_LEVELS: dict[str, int] = {"FP": 0, "INT8": 1, "INT6": 2, "INT4": 3}
SUPPORTED_ARCHS = ("gfx94", "gfx95")
WORLD_SIZES: tuple[int, ...] = (2, 4, 8)
# The library's default maximum problem size (2 GiB); servers take qr_max_size() from it.
MAX_BYTES = 2 * 1024 * 1024 * 1024
ALIGNMENT = 16


def quant_level() -> str | None:
    value = os.environ.get(QUANT_ENV, "").strip().upper()
    return value if value in QUANT_LEVELS else None


def _ops() -> Any:
    import sgl_kernel.allreduce  # type: ignore[import-not-found]

    return sgl_kernel.allreduce


class QuickArBackend(Backend):
    name = "quick_ar"
    variants = (VariantSpec(summary="sgl-kernel quick allreduce (ROCm)"),)
    simplicity = 60

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(
            device="cuda",  # ROCm devices are "cuda" devices to torch
            dtypes=("float16", "bfloat16"),
            world_sizes=WORLD_SIZES,
            max_bytes=MAX_BYTES,
            alignment_bytes=ALIGNMENT,
            graph_capturable=True,  # static IPC buffers: no graph-buffer registration
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        import torch

        if torch.version.hip is None:
            return "ROCm only"
        if reason := _gpu.cuda_refusal(ctx, rocm_ok=True):
            return reason
        arch = str(getattr(torch.cuda.get_device_properties(ctx.device), "gcnArchName", ""))
        if not any(a in arch for a in SUPPORTED_ARCHS):
            return f"needs an MI300-class GPU (gfx94x/gfx95x), have {arch or 'unknown'}"
        if quant_level() is None:
            return f"off unless {QUANT_ENV} is set to one of {', '.join(QUANT_LEVELS)}"
        if reason := _gpu.one_node_refusal(ctx):
            return reason
        if reason := _gpu.module_refusal("sgl_kernel.allreduce", "sgl-kernel"):
            return reason
        ops = _ops()
        if not all(hasattr(ops, fn) for fn in ("init_custom_qr", "qr_all_reduce", "qr_destroy")):
            return "this sgl-kernel build has no quick allreduce (qr_*) ops"
        return None

    def setup(self) -> None:
        import torch

        self.ops = _ops()
        level = quant_level()
        if level is None:
            raise RuntimeError(f"{QUANT_ENV} is not set to a quick-allreduce level")
        self.level = level
        self.cast_bf16 = _gpu.env_flag(CAST_ENV, default=True)
        self.fa: int | None = None
        with torch.cuda.device(self.ctx.device):
            self.fa = int(self.ops.init_custom_qr(self.ctx.rank, self.ctx.world_size, None))
            handle = self.ops.qr_get_handle(self.fa)
        handles = self.ctx.all_gather_object(handle)
        with torch.cuda.device(self.ctx.device):
            self.ops.qr_open_handles(self.fa, handles)
        self.ctx.barrier()

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.ops.qr_all_reduce(self.fa, QUANT_LEVELS[self.level], inp, out, self.cast_bf16)

    def engaged(self) -> str:
        cast = ", bf16 via fp16 kernels" if self.cast_bf16 else ""
        return f"sgl-kernel quick allreduce {self.level}{cast}"

    def release(self) -> None:
        if self.fa is None:
            return
        fa, self.fa = self.fa, None
        self.ops.qr_destroy(fa)
