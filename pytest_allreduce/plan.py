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
# Past the largest planned batch size the plan doubles up to --allreduce-max-tokens. Why
# geometric: past the latency-bound sizes an allreduce's time grows with its bytes, so two
# backends' ratio changes with the ratio of sizes, not their difference; doubling gives each
# octave one measurement, so covering prefill sizes costs log2(N) sizes, not N / 8. Where the
# winner changes between two tail sizes, bisection measures the sizes in between, and the
# consumer's size limits get keys on both sides anyway (selection.refinement_points).
TAIL_RATIO = 2
# A doubling that lands this close below the end is dropped: the end itself is measured.
TAIL_MIN_STEP = 1.25


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


def resolve_device(requested: str, gpu_count: int) -> str:
    if requested != "auto":
        return requested
    return "cuda" if gpu_count > 0 else "cpu"


def geometric_tail(largest: int, end: int) -> tuple[int, ...]:
    """Sizes after `largest` up to and including `end`, doubling (see TAIL_RATIO)."""
    if end <= largest:
        return ()
    sizes = []
    size = largest * TAIL_RATIO
    while size * TAIL_MIN_STEP <= end:
        sizes.append(size)
        size *= TAIL_RATIO
    return (*sizes, end)


def tail_end(
    device: str,
    world_sizes: tuple[int, ...],
    hidden_sizes: tuple[int, ...],
    dtypes: tuple[str, ...],
    max_tokens: int,
) -> int:
    """Where the tail stops: max_tokens, or sooner where no config choice changes what the
    consumer runs (on the CPU every entry runs gloo above cpu_shm's limit, so larger sizes
    decide nothing)."""
    from .consumer import profile_for
    from .serving import decision_horizon, possible_servers

    profile = profile_for(device)
    servers = [
        server
        for ws, hidden, dtype in product(world_sizes, hidden_sizes, dtypes)
        if ws >= 2
        for server in possible_servers(device, ws, dtype, hidden)
    ]
    return decision_horizon(profile, servers, max_tokens) if servers else max_tokens


@dataclass(frozen=True)
class Plan:
    device: str
    gpu_count: int
    variants: tuple[Variant, ...]
    world_sizes: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    batch_sizes: tuple[int, ...]  # the sizes asked for, then the tail
    max_tokens: int  # the largest token count the config must cover

    @classmethod
    def build(cls, options: Options, registry: BackendRegistry) -> Plan:
        """Raises ValueError naming unknown backends."""
        gpu_count = visible_gpu_count()
        device = resolve_device(options.device, gpu_count)
        end = tail_end(
            device,
            options.world_sizes,
            options.hidden_sizes,
            options.dtypes,
            options.max_tokens,
        )
        return cls(
            device=device,
            gpu_count=gpu_count,
            variants=tuple(registry.resolve(list(options.backends))),
            world_sizes=options.world_sizes,
            hidden_sizes=options.hidden_sizes,
            dtypes=options.dtypes,
            batch_sizes=(
                *options.batch_sizes,
                *geometric_tail(max(options.batch_sizes), end),
            ),
            max_tokens=options.max_tokens,
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
