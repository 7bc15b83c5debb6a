"""ResultStore: everything measured or decided in one session.

Suites write into it (through the plugin's report hook and the latency fixture); selection,
artifacts and the baseline gate read from it at session end.

Eligibility has two parts. A backend variant must have passed every gating suite at the
exact shape it would win, and it must not be disqualified for the whole (world size, hidden,
dtype): one failed check anywhere, in any suite and at any size, whether a test or
session-end work recorded it, shows the variant can give wrong results there, and the config
routes many sizes to each key. Only a failure at a size outside the variant's declared limits
is explained by them and disqualifies nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .backend import Limits
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
        self.variant_failures: dict[tuple[str, int], str] = {}
        self.accuracy_model: dict[str, Any] = {}  # the accuracy suite's model: name, sha256
        # Failed verdicts by target, so that eligibility (asked for every case by selection)
        # does not scan every verdict of the session.
        self.failures: dict[Target, list[tuple[Case, Verdict]]] = defaultdict(list)
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
        if verdict.outcome == "failed":
            self.failures[case.target].append((case, verdict))
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

    def limits(self, target: Target) -> Limits | None:
        """The variant's declared limits at the target's world size, as recorded with its
        availability (None before any rank was asked)."""
        availability = self.availability.get((target.backend, target.world_size))
        if availability is None or not availability.limits:
            return None
        return Limits(**availability.limits)

    def explained_by_limits(self, case: Case) -> str | None:
        """Why `case` lies outside the variant's declared limits, or None."""
        limits = self.limits(case.target)
        if limits is None:
            return None
        t = case.target
        return limits.shape_refusal(case.batch_size, t.hidden, t.dtype, t.world_size)

    def disqualifying_failures(self, target: Target) -> list[tuple[Case, Verdict]]:
        """Every failed check of `target`, in any suite at any size, that its declared
        limits do not explain; in order of size, then suite."""
        found = [
            (case, verdict)
            for case, verdict in self.failures.get(target, [])
            if self.explained_by_limits(case) is None
        ]
        return sorted(found, key=lambda failure: (failure[0].batch_size, failure[1].suite))

    def disqualification(self, target: Target) -> str | None:
        """Why `target` is out of the config for its (world size, hidden, dtype), or None."""
        if why := self.variant_failures.get((target.backend, target.world_size)):
            return f"disqualified at every shape of world size {target.world_size}: {why}"
        failures = self.disqualifying_failures(target)
        if not failures:
            return None
        shown = "; ".join(
            f"{v.suite} failed at {case.batch_size} rows ({v.test_id or 'no test id'})"
            for case, v in failures[:3]
        )
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        return f"disqualified by {len(failures)} failed check(s): {shown}{more}"

    def disqualified(self) -> dict[Target, str]:
        """Every disqualified target, with why."""
        variants = set(self.variant_failures)
        found = {
            t: self.disqualification(t)
            for t in sorted({*self.failures, *self.targets()})
            if t in self.failures or (t.backend, t.world_size) in variants
        }
        return {t: why for t, why in found.items() if why is not None}

    def ineligibility(self, case: Case) -> str | None:
        """Why `case` may not win at its size, or None when it may."""
        if why := self.disqualification(case.target):
            return why
        outcomes = {s: self.suite_outcome(case, s) for s in self.required_suites()}
        missing = ", ".join(f"{s} {o}" for s, o in outcomes.items() if o != "passed")
        return f"not passed at this size: {missing}" if missing else None

    def eligible(self, case: Case) -> bool:
        """Passed every required gating suite at this exact shape, and not disqualified."""
        return self.ineligibility(case) is None

    def disqualify(self, backend: str, world_size: int, reason: str) -> None:
        """Out of every config of that world size (any hidden, any dtype), for `reason`."""
        self.variant_failures.setdefault((backend, world_size), reason)

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
