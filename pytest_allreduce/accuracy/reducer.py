"""The backend under test inside the model, as a server runs it.

Each row-parallel reduce is the backend's fused job (its one-kernel allreduce + residual add
+ RMSNorm where it fuses, the engine's one add + RMSNorm composition after its allreduce
otherwise). A size outside the backend's declared limits goes to the server's fallback
(the reference backend, NCCL on CUDA), as servers fall back on refusal; the generation's
reduce counts say afterwards which share the backend carried.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..jobs import Work, add_rms_norm, backend_for

if TYPE_CHECKING:
    import torch

    from ..backend import Backend
    from ..context import RankContext

_REDUCERS = "accuracy:reducers"


class BackendReducer:
    """A ReduceAddNorm over one set-up backend with a fallback for sizes it refuses."""

    def __init__(self, ctx: RankContext, backend: Backend, fallback: Backend | None) -> None:
        self.ctx = ctx
        self.backend = backend
        self.fallback = fallback
        self.add_rms_norm = add_rms_norm(ctx.device)

    def carries(self, rows: int) -> bool:
        """Whether the backend itself takes a reduce of `rows` rows (the same decision on
        every rank: it depends on the shape only)."""
        backend = self.backend
        refusal = backend.limits_.shape_refusal(
            rows, backend.hidden, str(backend.dtype).removeprefix("torch."), self.ctx.world_size
        )
        return refusal is None and rows <= backend.max_rows

    def __call__(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        backend = self.backend if self.carries(partial.shape[0]) else self.fallback
        if backend is None:
            raise RuntimeError(
                f"{self.backend.full_name} refuses {partial.shape[0]} rows and has no fallback"
            )
        out = torch.empty_like(partial)
        if backend.fused:
            residual_out = torch.empty_like(residual)
            backend.fused_add_rms_norm(partial, residual, weight, eps, out, residual_out)
            return out, residual_out
        backend.all_reduce(partial, out)
        self.add_rms_norm.fn(out, residual, weight, eps)
        return out, residual

    def capture(self) -> contextlib.AbstractContextManager[None]:
        stack = contextlib.ExitStack()
        for backend in self._backends():
            stack.enter_context(backend.capture())
        return stack

    def after_capture(self) -> int:
        return sum(backend.after_capture() for backend in self._backends())

    def _backends(self) -> list[Backend]:
        return [b for b in (self.backend, self.fallback) if b is not None]


@dataclass(frozen=True)
class BackendReducerFactory:
    """Picklable: sent with every generation call; builds the reducer on a rank once and
    returns the same object afterwards (its CUDA graphs are kept per reducer object)."""

    work: Work
    fallback: Work | None

    def __call__(self, ctx: RankContext) -> BackendReducer:
        cache: dict[tuple[str, str | None], BackendReducer] = ctx.cache.setdefault(_REDUCERS, {})
        key = (self.work.target.label, self.fallback.target.label if self.fallback else None)
        reducer = cache.get(key)
        if reducer is None:
            backend = backend_for(ctx, self.work)
            fallback = backend_for(ctx, self.fallback) if self.fallback else None
            reducer = BackendReducer(ctx, backend, fallback)
            cache[key] = reducer
        return reducer
