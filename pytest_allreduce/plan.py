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


def visible_gpu_ids() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: the variable's own
    entries when it is set (indices, UUIDs or MIG names, kept as given), else 0..count-1.
    A subset of these entries, set as CUDA_VISIBLE_DEVICES, narrows a child to those GPUs."""
    count = visible_gpu_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in visible.split(",") if d.strip()][:count]


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


# ---- what makes a plan unusable here -----------------------------------------------------------


class PlanError(ValueError):
    """A plan that cannot run on this machine; `option` is the option to change."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def _device_of(variant: Variant, world_sizes: tuple[int, ...]) -> set[str]:
    return {variant.limits(ws).device for ws in world_sizes}


def check_choices(plan: Plan, requested_device: str) -> None:
    """Refuse, naming the option, a choice of which nothing could run here.

    Such a session would skip every test and write nothing useful, or end in an error deep
    inside a rank; pytest reports a PlanError as a usage error before anything starts. Each
    of these needs an explicit choice (the defaults never trigger one), so they hold in every
    session.
    """
    if 1 in plan.world_sizes:
        raise PlanError(
            "--allreduce-world-sizes",
            "world size 1 is not a process group: an allreduce over one rank moves nothing, "
            "and no server reads a tp1 config; use 2 or more",
        )
    if requested_device == "cuda" and plan.gpu_count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        narrowed = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise PlanError(
            "--allreduce-device=cuda",
            f"no GPU is visible to this process{narrowed}; use --allreduce-device=cpu or auto",
        )
    if not any(plan.device in _device_of(v, plan.world_sizes) for v in plan.variants):
        names = ",".join(v.name for v in plan.variants)
        if plan.device == "cpu":
            why = (
                "only GPU backends were selected, and this session runs on the CPU "
                f"({plan.gpu_count} GPUs visible); add a CPU backend (gloo, cpu_shm)"
            )
        else:
            why = (
                "only CPU backends were selected, and this session runs on cuda; "
                "use --allreduce-device=cpu for them"
            )
        raise PlanError(f"--allreduce-backends={names}", why)


def check_capacity(plan: Plan, *, torchrun: bool, workers: int = 1) -> None:
    """Refuse, naming the option, world sizes this machine (or each xdist worker's share of
    its GPUs) cannot hold. `workers` is the number of pytest-xdist workers sharing the GPUs
    (1 without xdist); under torchrun the launcher owns the GPUs and the world size."""
    if plan.device == "cuda" and not torchrun:
        largest = max(plan.world_sizes)
        share = plan.gpu_count // max(workers, 1)
        if largest > share:
            if largest <= plan.gpu_count:
                why = (
                    f"-n {workers} leaves each xdist worker {share} of the {plan.gpu_count} "
                    f"visible GPUs, and world size {largest} needs {largest}; use -n "
                    f"{plan.gpu_count // largest} or smaller world sizes"
                )
            else:
                why = f"world size {largest} needs {largest} GPUs; {plan.gpu_count} visible"
            sizes = ",".join(map(str, plan.world_sizes))
            raise PlanError(f"--allreduce-world-sizes={sizes}", why)


def plan_warnings(plan: Plan, *, workers: int = 1, cpus: int | None = None) -> list[str]:
    """What may make this plan's numbers misleading, though it can run."""
    warnings = []
    if plan.device == "cpu":
        cpus = usable_cpus() if cpus is None else cpus
        ranks = max(plan.world_sizes) * max(workers, 1)
        if ranks > cpus:
            across = f" ({workers} xdist workers x world size {max(plan.world_sizes)})"
            warnings.append(
                f"{ranks} ranks{across if workers > 1 else ''} share {cpus} CPU cores: "
                "ranks wait for a core, so latencies time the scheduler as much as the backend"
            )
    return warnings
