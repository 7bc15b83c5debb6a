"""Per-question results of one GSM8K run: plain data for the comparison and the evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass
class QuestionResult:
    """One question of one run."""

    doc_id: int
    strict: bool
    flexible: bool
    response: str  # the text lm-eval scored
    # Token-level record (in-process runs only; None for endpoints).
    tokens: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclass(frozen=True)
class BatchStats:
    """One generation batch of an in-process run, as rank 0 timed it."""

    rows: int
    prefill_forwards: int
    decode_steps: int
    prefill_s: float
    decode_s: float
    # Per rank, what reducer.after_capture() returned after each CUDA-graph capture; ranks
    # that registered different numbers of graph buffers disagree about the graphs.
    graph_buffers_registered: tuple[tuple[int, ...], ...]
    # Rows of each row-parallel reduce -> how many reduces had that many rows.
    reduce_rows: dict[int, int] = field(default_factory=dict)


@dataclass
class GSM8KRun:
    questions: list[QuestionResult]
    accuracy_strict: float
    accuracy_flexible: float
    seconds: float
    # Where a rank's tokens differed from rank 0's (in-process runs); empty when all agree.
    rank_mismatches: list[str] = field(default_factory=list)
    batches: list[BatchStats] = field(default_factory=list)  # in-process runs only

    @property
    def n(self) -> int:
        return len(self.questions)

    @property
    def generation_s(self) -> float:
        """Rank 0's prefill and decode time over every batch; the whole run's wall time for
        runs without batch records (endpoints). Unlike `seconds` it leaves out what only the
        first run of a session pays (loading the model into the ranks, reading the data)."""
        if not self.batches:
            return self.seconds
        return sum(b.prefill_s + b.decode_s for b in self.batches)

    @property
    def questions_per_s(self) -> float:
        """Questions answered per second of generation."""
        seconds = self.generation_s
        return self.n / seconds if seconds > 0 else float("inf")
