"""Plan: backends x world sizes x hidden sizes x dtypes x batch sizes for this session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import product

from .model import Case, Target
from .options import Options
from .registry import BackendRegistry, Variant


def visible_gpu_count() -> int:
    """GPUs visible to this process, counted without initialising CUDA here.

    The pytest process must never hold a CUDA context (ranks own the GPUs), so NVML is asked
    first; torch's count is the fallback (it queries the driver but creates no context).
    """
    import torch

    if not torch.backends.cuda.is_built() and torch.version.hip is None:
        return 0
    count_nvml = getattr(torch.cuda, "_device_count_nvml", None)
    if count_nvml is not None:
        try:
            count = int(count_nvml())
            if count >= 0:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                if visible is not None:
                    count = min(count, len([d for d in visible.split(",") if d.strip()]))
                return count
        except Exception:
            pass
    return torch.cuda.device_count()


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if visible_gpu_count() > 0 else "cpu"


@dataclass(frozen=True)
class Plan:
    device: str
    variants: tuple[Variant, ...]
    world_sizes: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    batch_sizes: tuple[int, ...]

    @classmethod
    def build(cls, options: Options, registry: BackendRegistry) -> Plan:
        """Raises ValueError naming unknown backends."""
        return cls(
            device=resolve_device(options.device),
            variants=tuple(registry.resolve(list(options.backends))),
            world_sizes=options.world_sizes,
            hidden_sizes=options.hidden_sizes,
            dtypes=options.dtypes,
            batch_sizes=options.batch_sizes,
        )

    @property
    def max_rows(self) -> int:
        return max(self.batch_sizes)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def targets(self) -> list[Target]:
        return [
            Target(v.name, ws, hidden, dtype)
            for ws, hidden, dtype, v in product(
                self.world_sizes, self.hidden_sizes, self.dtypes, self.variants
            )
        ]

    def cases(self) -> list[Case]:
        return [t.at(bs) for t in self.targets() for bs in self.batch_sizes]
