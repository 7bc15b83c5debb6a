"""CPU backends, each wrong in exactly one way that real allreduce kernels have been wrong
in, for the tests that show the check table catches each class and keeps it out of the
config.

Most run beside gloo under their own names: the suites' own checks must fail them. One,
`BandedGloo`, is registered with `replace=True` in place of gloo itself, the backend the CPU
runtime runs for every entry: it is right at every size the suites measure and wrong only in
a band between them, so only session-end work at the sizes the config routes to it can catch
it. The pytester sessions import this module by name (the spawned ranks unpickle the classes
from it), so it is copied into each pytester directory.
"""

from __future__ import annotations

import random
import time

import torch
import torch.distributed as dist
from pytest_allreduce.backends.gloo import GlooBackend

from pytest_allreduce.backend import Backend, Limits, QuantizedOutput, VariantSpec
from pytest_allreduce.checks import E2M1_VALUES, NVFP4_BLOCK, round_e2m1, round_e4m3
from pytest_allreduce.jobs import add_rms_norm

ALL_DTYPES = ("float32", "float16", "bfloat16")


class _OverGloo(Backend):
    """A correct allreduce through gloo that subclasses break in one place."""

    variants = (VariantSpec(server_type="gloo", summary="gloo with a deliberate defect"),)
    simplicity = -1
    dtypes: tuple[str, ...] = ALL_DTYPES

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(device="cpu", dtypes=cls.dtypes)

    @classmethod
    def probe(cls, ctx, variant):
        return None

    def setup(self) -> None:
        self.calls = 0

    def gloo_sum(self, t: torch.Tensor) -> torch.Tensor:
        total = t.clone()
        dist.all_reduce(total, group=self.ctx.cpu_group)
        return total

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.calls += 1
        out.copy_(self.gloo_sum(inp))


class TruncatingSum(_OverGloo):
    """Sums in float32 and truncates to bfloat16 (drops the low 16 bits) instead of
    rounding: results are off by up to one ulp, always towards zero."""

    name = "truncating_sum"
    dtypes = ("bfloat16",)

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        total = self.gloo_sum(inp.float())
        out.copy_((total.view(torch.int32) & -65536).view(torch.float32))  # exact in bf16


class Float16Accumulator(_OverGloo):
    """Carries bfloat16 through float16 (as a kernel with a half-precision accumulator
    does): 65504 is its largest value, and magnitudes under 6e-8 vanish."""

    name = "float16_accumulator"
    dtypes = ("bfloat16",)

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self.gloo_sum(inp.to(torch.float16)))


class IgnoresEps(_OverGloo):
    """A fused kernel whose RMSNorm adds 1e4 times the epsilon it is given (a unit slip
    in a kernel argument): invisible on rows of RMS about 1."""

    name = "ignores_eps"
    variants = (VariantSpec(server_type="gloo", fused=True, summary="fused, eps scaled by 1e4"),)

    def _fused(self, inp, residual, weight, eps, out, residual_out) -> None:
        self._all_reduce(inp, out)
        residual_out.copy_(residual)
        add_rms_norm(out.device).fn(out, residual_out, weight, eps * 1e4)


class RankDivergentNorm(_OverGloo):
    """A fused kernel whose ranks round their normalised outputs differently (each rank
    normalises its own copy of the sum, one of them with another reduction order): rank 1's
    output differs from rank 0's in the last bit of every 97th element. Every rank's output
    is within the norm's error bound; only comparing the ranks' bits finds it, and in a server
    the ranks' activations, meant to be identical, drift apart."""

    name = "rank_divergent_norm"
    variants = (
        VariantSpec(server_type="gloo", fused=True, summary="fused, last bit differs by rank"),
    )
    dtypes = ("bfloat16",)

    def _fused(self, inp, residual, weight, eps, out, residual_out) -> None:
        self._all_reduce(inp, out)
        residual_out.copy_(residual)
        add_rms_norm(out.device).fn(out, residual_out, weight, eps)
        if self.ctx.rank == 1:
            every = out.view(-1)[::97]
            every.copy_((every.view(torch.int16) ^ 1).view(torch.bfloat16))


class BandedGloo(GlooBackend):
    """gloo, right at every size but 41 to 47 rows, where its last row is never reduced (a
    tail loop that only runs for some sizes): no plan of 1, 32, 64 measures a size in the
    band. Registered in place of gloo (`replace=True`)."""

    band = range(41, 48)

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        super()._all_reduce(inp, out)
        if inp.shape[0] in self.band:
            out[-1].copy_(inp[-1])


class WrongFromCall129(_OverGloo):
    """Right for its first 128 calls, then one element off by one on every call (a counter
    that wraps, a ring buffer whose 129th slot is stale)."""

    name = "wrong_from_call_129"

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        super()._all_reduce(inp, out)
        if self.calls > 128:
            out.view(-1)[0] += 1


class RacyBackToBack(_OverGloo):
    """A shared-memory race: when a call starts within 20 ms of the previous one ending,
    half of the time (at random) it reads its peers' slots before they were rewritten and
    sums their previous inputs with this rank's current one."""

    name = "racy_back_to_back"
    window_s = 0.020

    def setup(self) -> None:
        super().setup()
        self.rng = random.Random(1000 + self.ctx.rank)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ended = 0.0

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        total = self.gloo_sum(inp)  # every rank still takes part: the ranks stay in step
        back_to_back = time.monotonic() - self.ended < self.window_s
        previous = self.previous
        same_shape = previous is not None and previous[0].shape == inp.shape
        if back_to_back and same_shape and self.rng.random() < 0.5:
            old_input, old_total = previous
            total = inp + (old_total - old_input)
        self.previous = (inp.clone(), total.clone())
        out.copy_(total)
        self.ended = time.monotonic()


class HangsAt32(_OverGloo):
    """Rank 1 never returns from a call of 32 rows (a spin-wait on a flag nobody sets)."""

    name = "hangs_at_32"

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if inp.shape[0] == 32 and self.ctx.rank == 1:
            time.sleep(3600)
        super()._all_reduce(inp, out)


# ---- quantized outputs -------------------------------------------------------------------


def quantize_e4m3(x: torch.Tensor, scale: float, truncate: bool = False) -> torch.Tensor:
    """x / scale in e4m3, rounded to nearest (or, broken, towards zero)."""
    target = x.float() / scale
    rounded = round_e4m3(target).to(torch.float8_e4m3fn)
    if not truncate:
        return rounded
    # e4m3 codes grow with magnitude: one code down is the next value towards zero.
    away = (rounded.float().abs() > target.abs()) & (rounded.float() != 0)
    codes = rounded.view(torch.uint8)
    return torch.where(away, codes - 1, codes).view(torch.float8_e4m3fn)


def quantize_nvfp4(
    x: torch.Tensor, scale: float, block: int = NVFP4_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed e2m1 codes, e4m3 scales of every 16 elements) of x, with the scales taken
    from the amax of `block` elements (16 is right; a kernel that takes 32 is not)."""
    rows, hidden = x.shape
    v = x.float()
    amax = v.view(rows, hidden // block, block).abs().amax(-1)
    scales = round_e4m3(amax / 6 / scale).repeat_interleave(block // NVFP4_BLOCK, dim=1)
    divisor = (scales * scale).repeat_interleave(NVFP4_BLOCK, dim=1)
    values = torch.where(divisor > 0, round_e2m1(v / divisor.clamp_min(1e-30)), 0.0)
    grid = torch.tensor(E2M1_VALUES)
    codes = (values.abs().unsqueeze(-1) == grid).float().argmax(-1) + 8 * (values < 0).long()
    pairs = codes.view(rows, hidden // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return packed, scales.to(torch.float8_e4m3fn)


class QuantizingFused(_OverGloo):
    """A fused backend that also writes a quantized copy of its output, as FlashInfer's
    FP8 and FP4 fusion patterns do, through the Backend.quantized_output contract. The
    "_truncated" and "_block32" variants are wrong: FP8 codes truncated instead of
    rounded, NVFP4 scales taken over 32 elements instead of 16."""

    name = "quantizing_fused"
    dtypes = ("bfloat16",)
    variants = tuple(
        VariantSpec(suffix, server_type="gloo", fused=True, summary=f"fused + {suffix}")
        for suffix in ("fp8", "fp8_truncated", "nvfp4", "nvfp4_block32")
    )
    scale = 0.5

    def setup(self) -> None:
        super().setup()
        self.last: QuantizedOutput | None = None

    def _fused(self, inp, residual, weight, eps, out, residual_out) -> None:
        self._all_reduce(inp, out)
        residual_out.copy_(residual)
        add_rms_norm(out.device).fn(out, residual_out, weight, eps)
        if self.variant.startswith("fp8"):
            truncate = self.variant.endswith("truncated")
            values = quantize_e4m3(out, self.scale, truncate)
            self.last = QuantizedOutput("fp8_e4m3", values, self.scale)
        else:
            block = 32 if self.variant.endswith("block32") else NVFP4_BLOCK
            packed, scales = quantize_nvfp4(out, self.scale, block)
            self.last = QuantizedOutput("nvfp4", packed, self.scale, scales)

    def quantized_output(self) -> QuantizedOutput | None:
        return self.last


BROKEN: tuple[type[Backend], ...] = (
    TruncatingSum,
    Float16Accumulator,
    IgnoresEps,
    RankDivergentNorm,
    WrongFromCall129,
    RacyBackToBack,
    HangsAt32,
    QuantizingFused,
)
