"""Plain data shared by the engine, the suites and the artifacts.

Everything here is picklable and free of torch objects, so it crosses the pipe between the
pytest process and its ranks, and lands in JSON evidence without conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The two jobs a backend is timed on. "allreduce" is the bare collective; "fused" is the
# server's job: allreduce, then residual add, then RMSNorm (fused by the backend where it
# can, composed by the engine otherwise), so every backend competes on the same work.
Job = Literal["allreduce", "fused"]
JOBS: tuple[Job, ...] = ("allreduce", "fused")

# Suites whose pass at a shape makes a backend eligible to win there.
GATING_SUITES: tuple[str, ...] = ("numerics", "graph")


@dataclass(frozen=True, order=True)
class Target:
    """One backend variant at one (world size, hidden, dtype): what a set-up serves."""

    backend: str  # full variant name, e.g. "torch_symm_mem_two_shot"
    world_size: int
    hidden: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"

    def at(self, batch_size: int) -> Case:
        return Case(self, batch_size)

    @property
    def group_key(self) -> GroupKey:
        return GroupKey(self.world_size, self.hidden, self.dtype)

    @property
    def label(self) -> str:
        return f"{self.backend}-tp{self.world_size}-h{self.hidden}-{self.dtype}"


@dataclass(frozen=True, order=True)
class GroupKey:
    """What one emitted config covers: a world size, a hidden size and a dtype."""

    world_size: int
    hidden: int
    dtype: str

    @property
    def label(self) -> str:
        return f"tp{self.world_size}-h{self.hidden}-{self.dtype}"


@dataclass(frozen=True, order=True)
class Case:
    """A target at one batch size (rows per allreduce): the unit every suite checks."""

    target: Target
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.target.label}-bs{self.batch_size}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one suite's check at one case."""

    suite: str
    outcome: Literal["passed", "failed", "skipped"]
    detail: str = ""
    test_id: str = ""


@dataclass
class Latency:
    """Timed samples of one job at one case.

    Each sample is one timed replay of `ops_per_sample` back-to-back ops, divided by that
    count, and taken as the maximum over ranks (a collective is as slow as its slowest rank).
    """

    case: Case
    job: Job
    samples_us: list[float]
    ops_per_sample: int
    clock: Literal["cuda_graph", "cuda_eager", "wall_clock"]  # cuda_eager: cannot be captured
    message_bytes: int
    # The code path that actually ran (e.g. "fused kernel" or "composed"), so a silent
    # fallback inside a backend shows up in the evidence instead of being mistaken for it.
    engaged: str = ""

    @property
    def median_us(self) -> float:
        from .stats import median

        return median(self.samples_us)

    @property
    def spread_us(self) -> tuple[float, float]:
        """The 10th and 90th percentiles of the samples."""
        from .stats import spread

        return spread(self.samples_us)

    @property
    def algbw_gbps(self) -> float:
        """Bytes of one rank's input per second of the median op, in GB/s (nccl-tests)."""
        return self.message_bytes / (self.median_us * 1e-6) / 1e9

    @property
    def busbw_gbps(self) -> float:
        """algbw scaled by 2(n-1)/n, the share each link carries in a ring allreduce, so
        figures are comparable across world sizes (nccl-tests' convention)."""
        n = self.case.target.world_size
        return self.algbw_gbps * 2 * (n - 1) / n


@dataclass(frozen=True)
class VariantInfo:
    """What results, selection and reports need of a variant's declaration (plain data)."""

    name: str
    server_type: str | None  # the config backend_type naming it; None: never written
    fused: bool  # its fused job is one kernel
    simplicity: int  # lower is simpler; ties go to the simpler


@dataclass
class Availability:
    """Whether a backend variant runs at a world size, agreed by every rank."""

    backend: str
    world_size: int
    available: bool
    reason: str = ""  # why not, naming the rank that declined
    limits: dict[str, object] = field(default_factory=dict)
