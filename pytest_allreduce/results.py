"""ResultStore: everything measured or decided in one session.

Suites write into it (through the plugin's report hook and the latency fixture); selection,
artifacts and the baseline gate read from it at session end.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .model import (
    GATING_SUITES,
    Availability,
    Case,
    GroupKey,
    Job,
    Latency,
    Target,
    VariantInfo,
    Verdict,
)


class ResultStore:
    def __init__(self, device: str) -> None:
        self.device = device  # "cuda" or "cpu"
        self.availability: dict[tuple[str, int], Availability] = {}
        self.verdicts: dict[Case, dict[str, list[Verdict]]] = defaultdict(lambda: defaultdict(list))
        self.latencies: dict[tuple[Case, Job], Latency] = {}
        self.variants: dict[str, VariantInfo] = {}  # full variant name -> its declaration
        # (variant, world size) -> the accuracy suite's summary of its GSM8K run
        self.accuracy: dict[tuple[str, int], dict[str, Any]] = {}
        # (variant, world size) -> why it may win at no size, hidden or dtype of that world
        # size (a wrong model answer is not tied to one shape)
        self.disqualified: dict[tuple[str, int], str] = {}
        self.accuracy_model: dict[str, Any] = {}  # the accuracy suite's model: name, sha256
        self.machine: dict[str, Any] = {}
        self.suites_run: set[str] = set()

    # ---- writing -----------------------------------------------------------------------------

    def declare(self, info: VariantInfo) -> None:
        self.variants[info.name] = info

    def server_type(self, name: str) -> str | None:
        info = self.variants.get(name)
        return info.server_type if info else None

    def fused(self, name: str) -> bool:
        info = self.variants.get(name)
        return bool(info and info.fused)

    def record_availability(self, availability: Availability) -> None:
        self.availability[(availability.backend, availability.world_size)] = availability

    def record_verdict(self, case: Case, verdict: Verdict) -> None:
        self.verdicts[case][verdict.suite].append(verdict)
        if verdict.outcome != "skipped":
            self.suites_run.add(verdict.suite)

    def record_latency(self, latency: Latency) -> None:
        self.latencies[(latency.case, latency.job)] = latency

    # ---- reading -----------------------------------------------------------------------------

    def required_suites(self) -> tuple[str, ...]:
        """Gating suites a backend must pass at a shape to be eligible there.

        The graph suite applies on CUDA only. A gating suite that did not run at all this
        session cannot vouch for anyone, so selection then has no candidates (reported).
        """
        return tuple(s for s in GATING_SUITES if s != "graph" or self.device == "cuda")

    def missing_suites(self) -> list[str]:
        return [s for s in self.required_suites() if s not in self.suites_run]

    def suite_outcome(self, case: Case, suite: str) -> str:
        """ "passed" when every check of `suite` at `case` passed, "failed" when any failed,
        "skipped" when all skipped, "not run" when none was recorded."""
        verdicts = self.verdicts.get(case, {}).get(suite, [])
        if not verdicts:
            return "not run"
        outcomes = {v.outcome for v in verdicts}
        if "failed" in outcomes:
            return "failed"
        if outcomes == {"skipped"}:
            return "skipped"
        return "passed"

    def eligible(self, case: Case) -> bool:
        """Passed every required gating suite at this exact shape, and not disqualified."""
        if (case.target.backend, case.target.world_size) in self.disqualified:
            return False
        return all(self.suite_outcome(case, s) == "passed" for s in self.required_suites())

    def disqualify(self, backend: str, world_size: int, reason: str) -> None:
        self.disqualified.setdefault((backend, world_size), reason)

    def latency(self, case: Case, job: Job) -> Latency | None:
        return self.latencies.get((case, job))

    def targets(self) -> list[Target]:
        found = {case.target for case in self.verdicts} | {c.target for c, _ in self.latencies}
        return sorted(found)

    def group_keys(self) -> list[GroupKey]:
        return sorted({t.group_key for t in self.targets()})

    def batch_sizes(self, key: GroupKey) -> list[int]:
        """Sizes that were timed: selection rows. Sizes only the numerics suite checked (the
        awkward ones) have no latency to select on."""
        return sorted({c.batch_size for c, _ in self.latencies if c.target.group_key == key})

    def checked_batch_sizes(self, key: GroupKey) -> list[int]:
        """Every size anything was recorded at: the evidence covers these."""
        sizes = {c.batch_size for c in self.verdicts if c.target.group_key == key}
        return sorted(sizes | set(self.batch_sizes(key)))

    def cases(self, key: GroupKey, batch_size: int) -> list[Case]:
        return [t.at(batch_size) for t in self.targets() if t.group_key == key]
