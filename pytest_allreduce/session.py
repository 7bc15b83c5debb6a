"""AllreduceSession: owns one pytest session's plan, rank pools, results and artifacts."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import checks, fingerprint, timing
from .context import multicast_disabled_by
from .jobs import Work, vote_availability
from .model import JOBS, Availability, Case, GroupKey, Job, Latency, Target, Verdict
from .options import Options
from .plan import Plan, visible_gpu_count
from .pool import Executor, InProcessGroup, RankFailure, RankPool
from .registry import BackendRegistry, Variant
from .results import ResultStore

# Rows the numerics suite always checks besides the plan's: awkward sizes that vectorised
# kernels get wrong first (a single row, an odd count, one below a power of two).
AWKWARD_ROWS: tuple[int, ...] = (1, 3, 127)
# Replays per graph in the graph suite (peers.md: hangs show up only over many replays).
GRAPH_REPLAYS = 1000
# Bisection stops after this many rounds per config even if crossovers remain wider.
MAX_BISECTION_ROUNDS = 6
# ... and does not split a crossover interval narrower than this fraction of its lower end
# (at least 2 rows): a server's nearest-key lookup gains nothing from finer keys, and on
# noisy machines finer splits only chase noise.
BISECTION_RESOLUTION = 1 / 16


def worth_splitting(measured: list[int], point: int) -> bool:
    """Whether `point` splits a crossover interval still wider than the resolution."""
    if point in measured:
        return False
    lower = max((m for m in measured if m < point), default=point)
    upper = min((m for m in measured if m > point), default=point)
    return upper - lower > max(2, int(lower * BISECTION_RESOLUTION))


def under_torchrun() -> bool:
    """pytest itself was started by torchrun (or another launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class SessionReport:
    """What the terminal summary prints at the end."""

    artifacts: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class AllreduceSession:
    def __init__(self, options: Options, plan: Plan, registry: BackendRegistry) -> None:
        self.options = options
        self.plan = plan
        self.registry = registry
        self.store = ResultStore(plan.device)
        self.torchrun = under_torchrun()
        self.extra_rows: set[int] = set(AWKWARD_ROWS)
        self.timing_plan = timing.TimingPlan.for_device(plan.device)
        self.report = SessionReport()
        self.pool_starts = 0
        self._executors: dict[int, Executor] = {}
        self._gpu_count: int | None = None
        for variant in plan.variants:
            limits = variant.cls.limits(variant.variant, max(plan.world_sizes))
            self.store.backend_types[variant.name] = variant.cls.variant_backend_type(
                variant.variant
            )
            self.store.simplicity[variant.name] = variant.cls.simplicity
            if limits.fused:
                self.store.fused_backends.add(variant.name)
        self._planned_targets = set(plan.targets())

    # ---- who writes ----------------------------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """Only one process writes artifacts: rank 0 under torchrun, else this one."""
        return not self.torchrun or int(os.environ["RANK"]) == 0

    # ---- executors -----------------------------------------------------------------------

    def gpu_count(self) -> int:
        if self._gpu_count is None:
            self._gpu_count = visible_gpu_count() if self.plan.device == "cuda" else 0
        return self._gpu_count

    def cannot_start(self, world_size: int) -> str | None:
        """Why no process group of this size can exist here, or None."""
        if self.torchrun:
            job_size = int(os.environ["WORLD_SIZE"])
            if world_size != job_size:
                return f"world size {world_size} differs from this torchrun job's {job_size}"
            return None
        if self.plan.device == "cuda" and world_size > self.gpu_count():
            return f"world size {world_size} needs {world_size} GPUs; {self.gpu_count()} visible"
        return None

    def executor(self, world_size: int) -> Executor:
        current = self._executors.get(world_size)
        if current is not None and not current.broken:
            return current
        self._executors.pop(world_size, None)
        if self.torchrun:
            current = InProcessGroup(self.plan.device, self.options.timeout_s)
        else:
            # One pool at a time: pools of several sizes would share the same GPUs.
            self.close_pools()
            current = RankPool(world_size, self.plan.device, self.options.timeout_s).start()
            self.pool_starts += 1
        self._executors[world_size] = current
        if not self.store.machine:
            self.store.machine = current.run(fingerprint.collect)[0]
        return current

    def call(self, world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(ctx, *args) on every rank; RankFailure when any rank fails (a broken pool is
        dropped here, so the next call starts a fresh one)."""
        executor = self.executor(world_size)
        try:
            return executor.run(fn, *args)
        except RankFailure:
            if executor.broken:
                self._executors.pop(world_size, None)
            raise

    def run(self, world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """`call` for tests: a rank failure fails the test with every rank's report."""
        try:
            return self.call(world_size, fn, *args)
        except RankFailure as failure:
            report = str(failure)
        # Outside the except block, so the report is shown once, not once more as the
        # exception "during handling" of which the failure was raised.
        pytest.fail(report, pytrace=False)

    def close_pools(self) -> None:
        for world_size, executor in list(self._executors.items()):
            try:
                executor.close()
            finally:
                del self._executors[world_size]

    # ---- availability and work -----------------------------------------------------------

    def availability(self, variant: Variant, world_size: int) -> Availability:
        key = (variant.name, world_size)
        known = self.store.availability.get(key)
        if known is not None:
            return known
        limits = variant.cls.limits(variant.variant, world_size)
        reason = self._engine_refusal(variant, world_size)
        if reason is None:
            answers = self.run(world_size, vote_availability, variant)[0]
            reason = "; ".join(f"rank {r}: {a}" for r, a in enumerate(answers) if a) or None
        result = Availability(
            variant.name, world_size, reason is None, reason or "", limits.as_dict()
        )
        self.store.record_availability(result)
        return result

    def engine_availability(self, target: Target) -> Availability:
        """Availability as far as it is known without asking any rank; an engine refusal
        is recorded at once, so the matrix lists it even though no test of it runs."""
        known = self.store.availability.get((target.backend, target.world_size))
        if known is not None:
            return known
        variant = self.plan.variant(target.backend)
        reason = self._engine_refusal(variant, target.world_size)
        if reason is None:
            return Availability(variant.name, target.world_size, True)
        limits = variant.cls.limits(variant.variant, target.world_size)
        refused = Availability(variant.name, target.world_size, False, reason, limits.as_dict())
        self.store.record_availability(refused)
        return refused

    def _engine_refusal(self, variant: Variant, world_size: int) -> str | None:
        """Reasons decided here, before any rank is asked (so multicast is never tried)."""
        limits = variant.cls.limits(variant.variant, world_size)
        if limits.device != self.plan.device:
            return f"a {limits.device} backend; this session runs on {self.plan.device}"
        if limits.needs_multicast and (switches := multicast_disabled_by()):
            return f"needs NVLink multicast, which is off here ({', '.join(switches)})"
        if reason := limits.world_size_refusal(world_size):
            return reason
        return self.cannot_start(world_size)

    def work(self, target: Target) -> Work:
        variant = self.plan.variant(target.backend)
        limits = variant.cls.limits(variant.variant, target.world_size)
        needed = max([*self.plan.batch_sizes, *self.extra_rows])
        largest = limits.largest_rows(target.hidden, target.dtype)
        # A bounded backend is set up for its whole range, so the limit checks reuse it.
        rows = largest if largest is not None else needed
        return Work(variant, target, max(rows, 1))

    def require(self, case: Case) -> Work:
        """The work for a case, or a skip saying why this case cannot run."""
        target = case.target
        variant = self.plan.variant(target.backend)
        availability = self.availability(variant, target.world_size)
        if not availability.available:
            pytest.skip(
                f"{target.backend} unavailable at world size {target.world_size}: "
                f"{availability.reason}"
            )
        limits = variant.cls.limits(variant.variant, target.world_size)
        refusal = limits.shape_refusal(
            case.batch_size, target.hidden, target.dtype, target.world_size
        )
        if refusal:
            pytest.skip(f"outside {target.backend}'s limits: {refusal}")
        return self.work(target)

    # ---- recording -----------------------------------------------------------------------

    def record_verdict(self, case: Case, verdict: Verdict) -> None:
        if case.target in self._planned_targets:
            self.store.record_verdict(case, verdict)

    def record_timing(self, case: Case, job: Job, result: timing.TimingResult) -> Latency:
        latency = Latency(
            case=case,
            job=job,
            samples_us=result.samples_us,
            ops_per_sample=result.ops_per_sample,
            clock=result.clock,  # type: ignore[arg-type]
            message_bytes=result.message_bytes,
            engaged=result.engaged,
        )
        self.store.record_latency(latency)
        return latency

    # ---- session end ---------------------------------------------------------------------

    def finish(self) -> SessionReport:
        """Select, bisect, write artifacts, gate. Only the writer process does the writing.

        Under torchrun every rank takes part in the bisection (its measurements are
        collective), so every rank runs the selection; only rank 0 writes.
        """
        from . import artifacts, gate, selection

        if not self.store.latencies:
            return self.report
        selections: dict[GroupKey, selection.Selection] = {}
        measured = set(self.store.group_keys())
        for ws in self.plan.world_sizes:  # plan order: the first planned dtype comes first
            for hidden in self.plan.hidden_sizes:
                for dtype in self.plan.dtypes:
                    if (key := GroupKey(ws, hidden, dtype)) in measured:
                        selections[key] = self._select_with_bisection(key)
        if not self.is_writer:
            return self.report
        if missing := self.store.missing_suites():
            self.report.notes.append(
                "no backend is eligible to win: the gating suite(s) "
                f"{', '.join(missing)} did not run in this session"
            )
        device_name = fingerprint.device_label(self.store.machine)
        written = artifacts.write_artifacts(
            self.store, selections, self.options.output_dir, device_name
        )
        self.report.artifacts += written
        self.report.notes += written.notes
        if self.options.save_baseline is not None:
            gate.save_baseline(self.store, self.options.save_baseline)
            self.report.artifacts.append(self.options.save_baseline)
        if self.options.baseline is not None:
            outcome = gate.check_baseline(self.store, self.options.baseline)
            self.report.gate_failures += [str(r) for r in outcome.regressions]
            self.report.notes += [str(n) for n in outcome.notes]
        return self.report

    def _select_with_bisection(self, key: GroupKey) -> Any:
        from . import selection

        chosen = selection.select(self.store, key)
        for _ in range(MAX_BISECTION_ROUNDS):
            measured = self.store.batch_sizes(key)
            points = [p for p in selection.bisection_points(chosen) if worth_splitting(measured, p)]
            points = self._agree(key.world_size, points)
            if not points:
                break
            for rows in points:
                self._qualify_and_time(key, rows)
            chosen = selection.select(self.store, key)
        return chosen

    def _agree(self, world_size: int, points: list[int]) -> list[int]:
        """Under torchrun, rank 0's bisection points for every rank: each rank selects from
        its own copy of the results, and one differing float must not make one rank measure
        a size the others do not."""
        if not self.torchrun:
            return points
        executor = self.executor(world_size)
        assert isinstance(executor, InProcessGroup)
        agreed: list[int] = executor.ctx.all_gather_object(points)[0]
        return agreed

    def _qualify_and_time(self, key: GroupKey, rows: int) -> None:
        """At a size between two measured ones: the gating checks, then the timing, for
        every backend that could be written to the config."""
        for target in sorted(self._planned_targets):
            if target.group_key != key or not self.store.backend_types.get(target.backend):
                continue
            variant = self.plan.variant(target.backend)
            limits = variant.cls.limits(variant.variant, target.world_size)
            availability = self.store.availability.get((target.backend, target.world_size))
            if availability is None or not availability.available:
                continue
            if limits.shape_refusal(rows, target.hidden, target.dtype, target.world_size):
                continue
            case = target.at(rows)
            work = self.work(target)
            try:
                for fn in (checks.exact_sum, checks.random_sum, checks.fused_job):
                    self._record_check(
                        case, "numerics", fn.__name__, self.call(target.world_size, fn, work, rows)
                    )
                if self.plan.device == "cuda" and limits.graph_capturable:
                    sizes = [rows]
                    result = self.call(target.world_size, checks.graph_replays, work, sizes, 100)
                    self._record_check(case, "graph", "graph_replays", result)
                if self.store.eligible(case):
                    for job in JOBS:
                        timed = self.call(
                            target.world_size, timing.measure, work, rows, job, self.timing_plan
                        )
                        self.record_timing(case, job, timed[0])
            except RankFailure as failure:
                self.record_verdict(
                    case, Verdict("numerics", "failed", str(failure)[:2000], "bisection")
                )

    def _record_check(
        self, case: Case, suite: str, name: str, reports: list[checks.CheckReport]
    ) -> None:
        problems = [f"rank {r.rank}: {p}" for r in reports for p in r.problems]
        outcome = "failed" if problems else "passed"
        self.record_verdict(
            case, Verdict(suite, outcome, "; ".join(problems)[:2000], f"bisection::{name}")
        )
