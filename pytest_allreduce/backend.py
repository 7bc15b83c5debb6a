"""The backend contract: what one allreduce backend module provides.

A backend module holds only its own probe, limits, set-up, call and release. The engine owns
everything else: which ranks run it, agreeing on availability, checking, timing, capture,
selection and reporting. The engine composes allreduce + residual add + RMSNorm for backends
that do not fuse it, so every backend competes on the same job.

This module imports no torch at import time: the plugin reads every backend's declarations
(names, variants, limits) while pytest starts, and a project that never runs an allreduce
must not pay for importing torch.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import torch

    from .context import RankContext

# Server config types (SGLang's adaptive allreduce). A GPU config only ever names these; a
# variant whose `server_type` is None is measured and reported but never written to one.
GPU_CONFIG_TYPES: frozenset[str] = frozenset(
    {"flashinfer_fusion", "torch_symm_mem", "custom_allreduce", "nccl"}
)
CPU_CONFIG_TYPES: frozenset[str] = frozenset({"gloo", "cpu_shm"})

# Bytes per element of the dtypes the plugin plans, so limits are checked without torch.
ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class UnsupportedInput(ValueError):
    """An input outside a backend's declared limits: refused before any collective starts."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class VariantSpec:
    """One selectable form of a backend: the single declaration every part reads.

    The engine reads `fused` to decide whether the fused job calls the backend's own kernel
    or composes it; the config writer and the loader read `server_type` to decide which
    config `backend_type` may name it; reports print `summary`.
    """

    suffix: str = ""  # "" for a backend with a single form, named like the backend
    # The config backend_type that names this variant, or None where no server config can
    # make a server run it (measured and reported, never written).
    server_type: str | None = None
    fused: bool = False  # its fused job is one kernel (allreduce + residual add + RMSNorm)
    summary: str = ""  # what it runs, in a few words, for reports


@dataclass(frozen=True)
class Limits:
    """What a backend variant accepts, as the servers enforce it.

    Sizes are per rank and inclusive: an input of exactly `max_bytes` bytes is accepted, one
    `alignment_bytes` larger is refused.
    """

    device: str  # "cuda" or "cpu"
    dtypes: tuple[str, ...]
    world_sizes: tuple[int, ...] | None = None  # None: any world size
    max_bytes: int | None = None
    max_rows: int | None = None
    min_rows: int = 1
    alignment_bytes: int = 1  # the input's byte size must be a multiple of this
    hidden_multiple: int = 1
    graph_capturable: bool = False
    needs_multicast: bool = False

    def world_size_refusal(self, world_size: int) -> str | None:
        if self.world_sizes is not None and world_size not in self.world_sizes:
            allowed = ", ".join(map(str, self.world_sizes))
            return f"world size {world_size} not supported (supports {allowed})"
        return None

    def shape_refusal(self, rows: int, hidden: int, dtype: str, world_size: int) -> str | None:
        """Why (rows, hidden, dtype) is outside these limits, or None when accepted."""
        if dtype not in self.dtypes:
            return f"dtype {dtype} not supported (supports {', '.join(self.dtypes)})"
        if reason := self.world_size_refusal(world_size):
            return reason
        if hidden % self.hidden_multiple:
            return f"hidden {hidden} is not a multiple of {self.hidden_multiple}"
        if rows < self.min_rows:
            return f"{rows} rows is below the minimum of {self.min_rows}"
        if self.max_rows is not None and rows > self.max_rows:
            return f"{rows} rows exceeds the maximum of {self.max_rows}"
        nbytes = rows * hidden * ITEMSIZE[dtype]
        if nbytes % self.alignment_bytes:
            return f"{nbytes} bytes is not a multiple of {self.alignment_bytes}"
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return f"{nbytes} bytes exceeds the maximum of {self.max_bytes}"
        return None

    def largest_rows(self, hidden: int, dtype: str) -> int | None:
        """The largest row count accepted at this hidden size, or None when unbounded."""
        itemsize = ITEMSIZE[dtype]
        bounds = [self.max_rows] if self.max_rows is not None else []
        if self.max_bytes is not None:
            bounds.append(self.max_bytes // (hidden * itemsize))
        if not bounds:
            return None
        rows = min(bounds)
        while rows >= self.min_rows and (rows * hidden * itemsize) % self.alignment_bytes:
            rows -= 1
        return rows

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class QuantizedOutput:
    """A fused call's quantized copy of its normalised output, in a layout a check can read.

    "fp8_e4m3": `values` is (rows, hidden) float8_e4m3fn and the output is value * scale.
    "nvfp4": `values` is (rows, hidden // 2) uint8 holding two e2m1 codes per byte (the even
    element in the low nibble), `block_scales` is (rows, hidden // 16) float8_e4m3fn in row
    order (not a kernel's swizzled tiling), and the output is code * block scale * scale.
    """

    format: Literal["fp8_e4m3", "nvfp4"]
    values: torch.Tensor
    scale: float
    block_scales: torch.Tensor | None = None


class Backend(abc.ABC):
    """One allreduce implementation, set up for (hidden, dtype, max_rows) on every rank.

    Subclasses declare `name`, `variants`, `limits()` and `probe()`, and implement `setup()`,
    `_all_reduce()`, `_fused()` for fused variants, and `release()` where set-up took
    something. Construction and `close()` are collective: every rank calls them together.
    """

    name: ClassVar[str]
    variants: ClassVar[tuple[VariantSpec, ...]]
    # Lower is simpler. Selection gives a statistical tie to the simpler backend.
    simplicity: ClassVar[int] = 50

    def __init__(
        self, ctx: RankContext, variant: str, hidden: int, dtype: torch.dtype, max_rows: int
    ) -> None:
        self.ctx = ctx
        self.variant = variant
        self.spec = self.variant_spec(variant)
        self.hidden = hidden
        self.dtype = dtype
        self.max_rows = max_rows
        self.limits_ = self.limits(variant, ctx.world_size)
        self.setup()

    # ---- declared by each backend -------------------------------------------------------

    @classmethod
    def variant_name(cls, variant: str) -> str:
        return f"{cls.name}_{variant}" if variant else cls.name

    @classmethod
    def variant_spec(cls, variant: str) -> VariantSpec:
        for spec in cls.variants:
            if spec.suffix == variant:
                return spec
        raise KeyError(f"{cls.name} has no variant {variant!r}")

    @classmethod
    @abc.abstractmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        """The variant's limits at this world size."""

    @classmethod
    @abc.abstractmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        """Why this rank cannot run the variant (package, capability, topology), or None.

        Local only: it must not enter a collective. The engine combines every rank's answer.
        """

    @abc.abstractmethod
    def setup(self) -> None:
        """Allocate buffers and exchange handles for inputs up to `max_rows` rows."""

    @abc.abstractmethod
    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Sum `inp` over the group into `out` (out of place; `inp` is left unchanged)."""

    def _fused(
        self,
        inp: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        out: torch.Tensor,
        residual_out: torch.Tensor,
    ) -> None:
        """residual_out = allreduce(inp) + residual; out = RMSNorm(residual_out) * weight."""
        raise NotImplementedError(f"{self.full_name} does not fuse residual add + RMSNorm")

    def capture(self) -> contextlib.AbstractContextManager[None]:
        """Entered around a CUDA-graph capture (custom allreduce records its buffers)."""
        return contextlib.nullcontext()

    def after_capture(self) -> int:
        """Called on every rank after each capture, before replay.

        Registers graph buffers where the backend needs it; returns how many it registered,
        which the engine compares across ranks.
        """
        return 0

    def engaged(self) -> str:
        """The code path this instance really runs (shown in the evidence)."""
        return self.spec.summary or self.full_name

    def quantized_output(self) -> QuantizedOutput | None:
        """The quantized copy of the normalised output its last fused call wrote, for variants
        that write one besides `out` (FP8 or FP4 for the next layer's GEMM); else None."""
        return None

    def release(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Free what `setup()` took. Called by `close()` once no peer touches it any more."""

    # ---- used by the engine ---------------------------------------------------------------

    @property
    def full_name(self) -> str:
        return self.variant_name(self.variant)

    @property
    def fused(self) -> bool:
        return self.spec.fused

    def close(self) -> None:
        """Collective: wait until this rank's kernels are done and every peer has arrived,
        so no peer still reads or writes what is freed, then release."""
        if self.ctx.is_cuda:
            import torch

            torch.cuda.synchronize(self.ctx.device)
        self.ctx.barrier()
        self.release()

    def check_input(self, inp: torch.Tensor) -> None:
        """Refuse, before any collective, an input outside the limits or the set-up size."""
        if inp.dim() != 2 or not inp.is_contiguous():
            raise UnsupportedInput(f"{self.full_name}: input must be a contiguous 2-D tensor")
        rows, hidden = inp.shape
        if hidden != self.hidden or inp.dtype != self.dtype:
            raise UnsupportedInput(
                f"{self.full_name}: set up for hidden {self.hidden} {dtype_name(self.dtype)}, "
                f"got hidden {hidden} {dtype_name(inp.dtype)}"
            )
        # Hidden size and dtype are fixed by now, so the verdict depends on the rows alone:
        # worked out once per row count (the stress suite calls thousands of times per size).
        # Made here rather than in __init__: a subclass that sets itself up without it
        # (or a test that builds one bare) still gets it.
        accepted: set[int] = self.__dict__.setdefault("_accepted_rows", set())
        if rows in accepted:
            return
        reason = self.limits_.shape_refusal(
            rows, hidden, dtype_name(inp.dtype), self.ctx.world_size
        )
        if reason is None and rows > self.max_rows:
            reason = f"{rows} rows exceeds the {self.max_rows} rows it was set up for"
        if reason:
            raise UnsupportedInput(f"{self.full_name}: {reason}")
        accepted.add(rows)

    def all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.check_input(inp)
        self._all_reduce(inp, out)

    def fused_add_rms_norm(
        self,
        inp: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        out: torch.Tensor,
        residual_out: torch.Tensor,
    ) -> None:
        self.check_input(inp)
        self._fused(inp, residual, weight, eps, out, residual_out)
