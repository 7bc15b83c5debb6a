"""Plan: backends x world sizes x hidden sizes x dtypes x batch sizes for this session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from .model import Target
from .options import Options
from .registry import BackendRegistry, Variant

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def visible_gpu_count() -> int:
    """GPUs visible to this process, counted without importing torch or touching CUDA.

    The pytest process must never hold a CUDA context (ranks own the GPUs), and a session
    that never runs an allreduce must not pay for importing torch, so the driver's own
    listing is read: one directory per NVIDIA GPU, narrowed by CUDA_VISIBLE_DEVICES. Where
    the driver has no such listing (ROCm, other platforms) torch is asked; its count
    queries the driver without creating a context.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 0
    if NVIDIA_GPUS.is_dir():
        count = len(list(NVIDIA_GPUS.iterdir()))
    elif Path("/dev/kfd").exists() or Path("/dev/nvidiactl").exists():
        import torch

        count = torch.cuda.device_count()
    else:
        return 0
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def gpu_model_name() -> str | None:
    """The model name the NVIDIA driver lists for this host's GPUs (e.g. "NVIDIA H200"),
    read without touching CUDA; None where there is no listing or the GPUs differ."""
    names = set()
    try:
        for gpu in NVIDIA_GPUS.iterdir():
            for line in (gpu / "information").read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    names.add(value.strip())
    except OSError:
        return None
    return names.pop() if len(names) == 1 else None


def resolve_device(requested: str, gpu_count: int) -> str:
    if requested != "auto":
        return requested
    return "cuda" if gpu_count > 0 else "cpu"


@dataclass(frozen=True)
class Plan:
    device: str
    gpu_count: int
    variants: tuple[Variant, ...]
    world_sizes: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    batch_sizes: tuple[int, ...]

    @classmethod
    def build(cls, options: Options, registry: BackendRegistry) -> Plan:
        """Raises ValueError naming unknown backends."""
        gpu_count = visible_gpu_count()
        return cls(
            device=resolve_device(options.device, gpu_count),
            gpu_count=gpu_count,
            variants=tuple(registry.resolve(list(options.backends))),
            world_sizes=options.world_sizes,
            hidden_sizes=options.hidden_sizes,
            dtypes=options.dtypes,
            batch_sizes=options.batch_sizes,
        )

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
