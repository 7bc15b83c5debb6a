"""The backend contract: what one allreduce backend module provides.

A backend module holds only its own probe, limits, set-up, call and teardown. The engine owns
everything else: which ranks run it, agreeing on availability, checking, timing, capture,
selection and reporting. The engine composes allreduce + residual add + RMSNorm for backends
that do not fuse it, so every backend competes on the same job.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .context import RankContext

# Server config types (SGLang's adaptive allreduce). A GPU config only ever names these; a
# backend whose `backend_type` is None is measured and reported but never written to one.
GPU_CONFIG_TYPES: frozenset[str] = frozenset(
    {"flashinfer_fusion", "torch_symm_mem", "custom_allreduce", "nccl"}
)
CPU_CONFIG_TYPES: frozenset[str] = frozenset({"gloo", "cpu_shm"})


class UnsupportedInput(ValueError):
    """An input outside a backend's declared limits: refused before any collective starts."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    fused: bool = False
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
        nbytes = rows * hidden * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        if nbytes % self.alignment_bytes:
            return f"{nbytes} bytes is not a multiple of {self.alignment_bytes}"
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return f"{nbytes} bytes exceeds the maximum of {self.max_bytes}"
        return None

    def largest_rows(self, hidden: int, dtype: str) -> int | None:
        """The largest row count accepted at this hidden size, or None when unbounded."""
        itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
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


class Backend(abc.ABC):
    """One allreduce implementation, set up for (hidden, dtype, max_rows) on every rank.

    Subclasses declare `name`, `backend_type`, `variants`, `limits()` and `probe()`, and
    implement `setup()`, `_all_reduce()` and, when their limits say `fused`, `_fused()`.
    Construction and `close()` are collective: every rank of the group calls them together.
    """

    name: ClassVar[str]
    # The type a server config names for this backend, or None where no server can load it.
    backend_type: ClassVar[str | None]
    # Variant suffixes; "" means the backend has a single form named `name`.
    variants: ClassVar[tuple[str, ...]] = ("",)
    # Lower is simpler. Selection gives a statistical tie to the simpler backend.
    simplicity: ClassVar[int] = 50

    def __init__(
        self, ctx: RankContext, variant: str, hidden: int, dtype: torch.dtype, max_rows: int
    ) -> None:
        self.ctx = ctx
        self.variant = variant
        self.hidden = hidden
        self.dtype = dtype
        self.max_rows = max_rows
        self.limits_ = self.limits(variant, ctx.world_size)
        self.setup()

    # ---- declared by each backend -------------------------------------------------------

    @classmethod
    def variant_name(cls, variant: str) -> str:
        return f"{cls.name}_{variant}" if variant else cls.name

    # Contract addition (GPU backends): a variant may map to a different server config type
    # than its backend, e.g. flashinfer_fusion's FP8/FP4-output variants map to None because
    # their output is quantized and cannot be the bf16/fp16 job output a server config selects.
    # The engine should read a variant's type through this method, not `backend_type`.
    @classmethod
    def variant_backend_type(cls, variant: str) -> str | None:
        """The server config type of one variant (default: the backend's `backend_type`)."""
        return cls.backend_type

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
        return self.full_name

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release what `setup()` took. Collective."""

    # ---- used by the engine ---------------------------------------------------------------

    @property
    def full_name(self) -> str:
        return self.variant_name(self.variant)

    @property
    def fused(self) -> bool:
        return self.limits_.fused

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
        reason = self.limits_.shape_refusal(
            rows, hidden, dtype_name(inp.dtype), self.ctx.world_size
        )
        if reason is None and rows > self.max_rows:
            reason = f"{rows} rows exceeds the {self.max_rows} rows it was set up for"
        if reason:
            raise UnsupportedInput(f"{self.full_name}: {reason}")

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


def iter_variants(cls: type[Backend]) -> Iterator[tuple[str, str]]:
    """(full name, variant) for every variant of a backend class."""
    for variant in cls.variants:
        yield cls.variant_name(variant), variant
