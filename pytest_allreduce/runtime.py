"""Running a config in a process group: AdaptiveAllReduce, for servers without SGLang's loader.

Also importable as `pytest_allreduce.config.AdaptiveAllReduce`; it lives apart from the
schema because it needs torch and set-up backends.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from .backend import dtype_name
from .config import AllreduceConfig, ConfigError, check_backend_names, default_registry
from .consumer import CPU_RUNTIME, Entry, Server
from .jobs import add_rms_norm

if TYPE_CHECKING:
    from .backend import Backend
    from .context import RankContext
    from .registry import BackendRegistry


class AdaptiveAllReduce:
    """Runs a config in a server that does not have SGLang's loader.

    On the CPU it is the consumer of CPU configs and follows the CPU profile
    (`consumer.CPU_RUNTIME`): an entry runs its backend where that backend takes the input
    (cpu_shm up to its size limit) and gloo otherwise. On CUDA it runs the variant each entry
    names, which is what SGLang's adaptive allreduce runs at that key (the writer names it so).

    Construction is collective: every rank resolves the variants the config can run, agrees
    that every rank can run them, and sets them up in sorted name order, so all ranks enter
    each backend's set-up collectives together. A dispatch decision depends only on the
    input's row count, which is the same on every rank, so all ranks pick the same backend.
    """

    def __init__(
        self,
        ctx: RankContext,
        config: AllreduceConfig,
        hidden: int,
        dtype: torch.dtype,
        max_rows: int,
        registry: BackendRegistry | None = None,
    ) -> None:
        if not isinstance(config, AllreduceConfig):
            raise TypeError(f"config must be an AllreduceConfig, got {type(config).__name__}")
        if config.device != ctx.device.type:
            raise ConfigError(f"a {config.device.upper()} config cannot run on device {ctx.device}")
        self.ctx = ctx
        self.config = config
        self.hidden = hidden
        self.dtype = dtype
        self.max_rows = max_rows
        registry = default_registry() if registry is None else registry
        check_backend_names(config, registry, "config")
        self._server: Server | None = None
        if config.device == "cpu":
            if ctx.world_size < 2:
                raise ConfigError("a CPU config serves a group of at least 2 ranks")
            self._server = Server.cpu(
                world_size=ctx.world_size, dtype=dtype_name(dtype), hidden=hidden
            )
        variants = {name: registry.variant(name) for name in self._runnable(config, max_rows)}
        # Every decision below is agreed before any backend's set-up collective starts: a
        # rank that refused alone would leave the others waiting in set-up forever.
        local = {name: v.cls.probe(ctx, v.variant) for name, v in variants.items()}
        refusals = [
            f"{name} on rank {rank}: {reason}"
            for rank, answers in enumerate(ctx.all_gather_object(local))
            for name, reason in sorted(answers.items())
            if reason is not None
        ]
        if refusals:
            raise ConfigError(
                "the config names backends this group cannot run: " + "; ".join(refusals)
            )
        self._backends: dict[str, Backend] = {}
        try:
            for name in sorted(variants):
                v = variants[name]
                # A bounded backend only ever runs up to its limit (the profile sends larger
                # inputs elsewhere), so its set-up never holds more.
                largest = v.limits(ctx.world_size).largest_rows(hidden, dtype_name(dtype))
                rows = max_rows if largest is None else max(1, min(max_rows, largest))
                self._backends[name] = v.cls(ctx, v.variant, hidden, dtype, rows)
        except BaseException:
            # The backends already set up are dropped, not closed: close() is collective,
            # and after a failed set-up the other ranks may never reach it.
            self._backends.clear()
            raise
        self.unfused: list[str] = sorted(
            {
                e.backend_name
                for e in config.values()
                if e.use_residual_rmsnorm_fusion and not self._backends[e.backend_name].fused
            }
        )
        if self.unfused and ctx.rank == 0:
            warnings.warn(
                f"the config asks for fused residual add + RMSNorm with {', '.join(self.unfused)}, "
                "which does not fuse here; composing allreduce + add + RMSNorm instead",
                RuntimeWarning,
                stacklevel=2,
            )

    def _runnable(self, config: AllreduceConfig, max_rows: int) -> list[str]:
        """Every variant a dispatch up to `max_rows` rows may pick."""
        if self._server is None:
            return sorted({e.backend_name for e in config.values()})
        names = set()
        for value in set(config.values()):
            entry = Entry(value.backend_type, value.use_residual_rmsnorm_fusion)
            rows = {1, max_rows}
            for stop in CPU_RUNTIME.stops(entry, self._server):
                rows |= {r for r in (stop.max_rows, stop.max_rows + 1) if r <= max_rows}
            names |= {CPU_RUNTIME.runs(entry, self._server, r).variant for r in rows}
        return sorted(names)

    @property
    def backends(self) -> dict[str, Backend]:
        """The set-up backends by full variant name."""
        return dict(self._backends)

    def variant_for(self, rows: int) -> str:
        """The variant the config runs for an input of `rows` rows."""
        value = self.config.lookup(rows)
        if self._server is None:
            return value.backend_name
        entry = Entry(value.backend_type, value.use_residual_rmsnorm_fusion)
        return CPU_RUNTIME.runs(entry, self._server, rows).variant

    def backend_for(self, rows: int) -> Backend:
        """The backend the config runs for an input of `rows` rows."""
        return self._backends[self.variant_for(rows)]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the group, in a new tensor."""
        backend = self.backend_for(x.shape[0])
        out = torch.empty_like(x)
        backend.all_reduce(x, out)
        return out

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(allreduce(x) + residual) * weight, allreduce(x) + residual).

        Fused in one call where the entry asks for it and the backend fuses; otherwise the
        allreduce is followed by the engine's one add + RMSNorm composition, the same the
        suites time and check.
        """
        entry = self.config.lookup(x.shape[0])
        backend = self.backend_for(x.shape[0])
        if entry.use_residual_rmsnorm_fusion and backend.fused:
            out = torch.empty_like(x)
            residual_out = torch.empty_like(residual)
            backend.fused_add_rms_norm(x, residual, weight, eps, out, residual_out)
            return out, residual_out
        out = torch.empty_like(x)
        residual_out = residual.clone()
        backend.all_reduce(x, out)
        add_rms_norm(x.device).fn(out, residual_out, weight, eps)
        return out, residual_out

    def close(self) -> None:
        """Release every backend, in set-up order. Collective."""
        backends, self._backends = self._backends, {}
        for name in sorted(backends):
            backends[name].close()
