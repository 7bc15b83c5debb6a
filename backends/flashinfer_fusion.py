"""FlashInfer TRT-LLM allreduce fused with residual add + RMSNorm (SGLang's flashinfer_fusion).

Variants (one-/two-shot is always passed explicitly; every rank makes the same choice):

- one_shot, two_shot: _fused runs pattern kARResidualRMSNorm (residual_out = sum + residual,
  out = RMSNorm(residual_out) * weight); _all_reduce runs pattern kAllReduce. one_shot is
  what SGLang's adaptive allreduce runs for a `flashinfer_fusion` entry with the fusion flag
  set (it always passes use_oneshot=True); two_shot is measured, never written.
- one_shot_fp8: _fused runs kARResidualRMSNormOutFP8Quant, which also writes an FP8 (e4m3)
  copy of the normed output into an internal buffer (scale 1.0). The job's output must be
  bf16/fp16, which an FP8 server path does not produce, so this variant is measured and
  reported but never selectable: no server type. It still writes norm_out (= out), so the
  numerics suite checks it like the others, and `quantized_output()` hands the FP8 copy to
  the fused check, which compares it with a reference quantization of norm_out;
  _all_reduce is plain kAllReduce.
- one_shot_fp4: the same with NVFP4 output (kARResidualRMSNormOutFP4Quant, 128x4 swizzled
  scales, unswizzled for the check). Only on compute capability >= 10: the SM90 build's FP4
  conversion returns zeros.

Limits: bf16/fp16 only. FlashInfer could run fp32 with an fp32 (Lamport) workspace, but the
server type this maps to serves bf16/fp16 only, so fp32 is declared unsupported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_allreduce.backend import Backend, Limits, QuantizedOutput, VariantSpec

from . import _flashinfer as fi
from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

FP4_MIN_MAJOR = 10
FP4_BLOCK = 16  # NVFP4: one scale per 16 elements
# The scale_factor passed with the FP8/FP4 patterns. At 1.0 it does not matter whether the
# kernels multiply or divide by it: the quantized values are the output's own.
QUANT_SCALE = 1.0


class FlashinferFusionBackend(Backend):
    name = "flashinfer_fusion"
    variants = (
        VariantSpec(
            "one_shot",
            server_type="flashinfer_fusion",
            fused=True,
            summary="flashinfer trtllm one-shot fused kARResidualRMSNorm",
        ),
        # The consumer always runs one-shot: no config entry makes it run this.
        VariantSpec(
            "two_shot",
            fused=True,
            summary="flashinfer trtllm two-shot fused kARResidualRMSNorm",
        ),
        # Quantized outputs cannot be the server's bf16/fp16 output: never in a config.
        VariantSpec(
            "one_shot_fp8",
            fused=True,
            summary="flashinfer trtllm one-shot fused kARResidualRMSNormOutFP8Quant",
        ),
        VariantSpec(
            "one_shot_fp4",
            fused=True,
            summary="flashinfer trtllm one-shot fused kARResidualRMSNormOutFP4Quant",
        ),
    )
    simplicity = 40

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        oneshot = variant.startswith("one_shot")
        max_bytes = None
        if oneshot:
            # Beyond the Lamport limit FlashInfer would silently run two-shot instead.
            max_bytes = (fi.MAX_LAMPORT_BYTES // max(world_size, 1)) // 16 * 16
        return Limits(
            device="cuda",
            dtypes=("bfloat16", "float16"),
            world_sizes=fi.TRTLLM_WORLD_SIZES,
            max_rows=fi.SERVER_MAX_ROWS,
            min_rows=1 if oneshot else world_size + 1,  # two-shot needs rows > world size
            max_bytes=max_bytes,
            hidden_multiple=FP4_BLOCK if variant == "one_shot_fp4" else fi.HIDDEN_MULTIPLE,
            graph_capturable=True,
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if reason := _gpu.one_node_refusal(ctx):
            return reason
        if variant == "one_shot_fp4":
            cap = _gpu.capability(ctx)
            if cap[0] < FP4_MIN_MAJOR:
                return (
                    f"FP4 output needs compute capability >= {FP4_MIN_MAJOR}.0, have "
                    f"{_gpu.capability_text(cap)} (the SM90 build's FP4 conversion returns 0)"
                )
        return fi.probe_flashinfer(ctx, fi.TRTLLM_MAJORS, "FlashInfer trtllm fusion")

    def setup(self) -> None:
        import torch

        self.workspace: Any = fi.create_workspace(
            self.ctx, "trtllm", self.max_rows, self.hidden, self.dtype
        )
        lib = fi.comm()
        patterns = lib.AllReduceFusionPattern
        self._allreduce_fusion = lib.allreduce_fusion
        self._plain = int(patterns.kAllReduce)
        self.oneshot = self.variant.startswith("one_shot")
        numel = self.max_rows * self.hidden
        device = self.ctx.device
        # Written by fused patterns but not part of the job's output: preallocated so no call
        # allocates (FlashInfer would otherwise allocate `output` on every fused call).
        self._ar_scratch = torch.empty(numel, dtype=self.dtype, device=device)
        self._quant: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None
        self._scale_factor: torch.Tensor | None = None
        self._layout: int | None = None
        self._last_rows: int | None = None  # of the last fused call, for quantized_output
        if self.variant == "one_shot_fp8":
            self._fused_pattern = int(patterns.kARResidualRMSNormOutFP8Quant)
            self._quant = torch.empty(numel, dtype=torch.float8_e4m3fn, device=device)
            self._scale_factor = torch.full((1,), QUANT_SCALE, device=device)
        elif self.variant == "one_shot_fp4":
            self._fused_pattern = int(patterns.kARResidualRMSNormOutFP4Quant)
            self._quant = torch.empty(numel // 2, dtype=torch.uint8, device=device)
            sf_size = lib.compute_fp4_swizzled_layout_sf_size(
                self.max_rows, self.hidden // FP4_BLOCK
            )
            self._scales = torch.empty(sf_size, dtype=torch.uint8, device=device)
            self._scale_factor = torch.full((1,), QUANT_SCALE, device=device)
            self._layout = int(lib.QuantizationSFLayout.SWIZZLED_128x4)
            self._sf_size = lib.compute_fp4_swizzled_layout_sf_size
        else:
            self._fused_pattern = int(patterns.kARResidualRMSNorm)

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self._allreduce_fusion(
            input=inp,
            workspace=self.workspace,
            pattern=self._plain,
            launch_with_pdl=False,
            output=out,
            use_oneshot=self.oneshot,
        )

    def _fused(
        self,
        inp: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        out: torch.Tensor,
        residual_out: torch.Tensor,
    ) -> None:
        rows, hidden = inp.shape
        extra: dict[str, Any] = {}
        if self.variant == "one_shot_fp8":
            assert self._quant is not None
            extra["quant_out"] = self._quant[: rows * hidden].view(rows, hidden)
            extra["scale_factor"] = self._scale_factor
        elif self.variant == "one_shot_fp4":
            assert self._quant is not None and self._scales is not None
            extra["quant_out"] = self._quant[: rows * hidden // 2].view(rows, hidden // 2)
            extra["scale_out"] = self._scales[: self._sf_size(rows, hidden // FP4_BLOCK)]
            extra["scale_factor"] = self._scale_factor
            extra["layout_code"] = self._layout
        self._allreduce_fusion(
            input=inp,
            workspace=self.workspace,
            pattern=self._fused_pattern,
            launch_with_pdl=False,
            output=self._ar_scratch[: rows * hidden].view(rows, hidden),
            residual_in=residual,
            rms_gamma=weight,
            rms_eps=eps,
            residual_out=residual_out,
            norm_out=out,
            use_oneshot=self.oneshot,
            **extra,
        )
        self._last_rows = rows

    def quantized_output(self) -> QuantizedOutput | None:
        if self._quant is None or self._last_rows is None:
            return None
        import torch

        rows, hidden = self._last_rows, self.hidden
        if self.variant == "one_shot_fp8":
            values = self._quant[: rows * hidden].view(rows, hidden)
            return QuantizedOutput("fp8_e4m3", values, QUANT_SCALE)
        assert self._scales is not None
        packed = self._quant[: rows * hidden // 2].view(rows, hidden // 2)
        scales = unswizzle_128x4(self._scales, rows, hidden // FP4_BLOCK)
        return QuantizedOutput("nvfp4", packed, QUANT_SCALE, scales.view(torch.float8_e4m3fn))

    def engaged(self) -> str:
        shot = "one-shot" if self.oneshot else "two-shot"
        fused = {
            "one_shot_fp8": "kARResidualRMSNormOutFP8Quant (norm_out + FP8 quant_out)",
            "one_shot_fp4": "kARResidualRMSNormOutFP4Quant (norm_out + NVFP4 quant_out)",
        }.get(self.variant, "kARResidualRMSNorm")
        return f"flashinfer trtllm {shot} fused: {fused}; allreduce: kAllReduce"

    def release(self) -> None:
        workspace, self.workspace = getattr(self, "workspace", None), None
        if workspace is not None:
            fi.destroy_workspace(self.ctx, workspace)


def unswizzle_128x4(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The (rows, cols) scale factors, row-major, of a buffer in the 128x4 tiled layout that
    FP4 GEMMs read: the matrix padded to 128-row by 4-column tiles, tiles stored column tile
    by column tile within a row tile, and inside a tile element (r, c) at
    (r % 32) * 16 + (r // 32) * 4 + c."""
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    tiles = swizzled[: padded_rows * padded_cols].view(
        padded_rows // 128, padded_cols // 4, 32, 4, 4
    )
    # (row tile, column tile, row % 32, row % 128 // 32, column % 4) -> rows, then columns
    return tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)[:rows, :cols]
