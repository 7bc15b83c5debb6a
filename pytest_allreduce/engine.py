"""The engine: rank pools, availability, and running checks and timings on every rank.

It knows nothing of pytest: it raises `CaseSkipped` where a case cannot run here and
`RankFailure` where a distributed call failed; the plugin's fixtures turn those into skips
and failures, and session-end work records them as verdicts. Everything that touches torch
or starts processes is imported here on first use, never while pytest starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .checktable import CHECKS, Check
from .context import multicast_disabled_by
from .model import Availability, Case, Job, Latency, Target

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .jobs import Work
    from .options import Options
    from .plan import Plan
    from .pool import Executor
    from .registry import Variant
    from .results import ResultStore
    from .timing import TimingPlan


class CaseSkipped(Exception):
    """A case that cannot run here, with the reason (becomes a pytest skip)."""


@dataclass(frozen=True)
class CheckOutcome:
    """One check's result at one case, over all ranks."""

    check: Check
    case: Case
    problems: tuple[str, ...]
    engaged: str

    @property
    def passed(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return f"[{self.engaged}]\n" + "\n".join(self.problems)


def under_torchrun() -> bool:
    """pytest itself was started by torchrun (or another launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Engine:
    def __init__(self, options: Options, plan: Plan, store: ResultStore) -> None:
        self.options = options
        self.plan = plan
        self.store = store
        self.torchrun = under_torchrun()
        self.pool_starts = 0
        self.swept: list[str] = []  # what killed sessions had left, removed at first start
        self._prepared = False
        self._executors: dict[int, Executor] = {}
        # Rows every set-up must hold: the plan's sizes and the checks' extra sizes.
        self.needed_rows = max([*plan.batch_sizes, *(r for c in CHECKS for r in c.extra_rows)])
        # Where a call hung or lost a rank: (target, rows) -> why, naming the test that met
        # it. The rest of that backend's work at that size is skipped with this reason
        # instead of each call waiting out the timeout and restarting the pool again.
        self.broken_cases: dict[tuple[Target, int], str] = {}
        self.current_test = ""  # the test (or session-end step) now calling, for that reason

    # ---- executors -----------------------------------------------------------------------

    def cannot_start(self, world_size: int) -> str | None:
        """Why no process group of this size can exist here, or None."""
        if self.torchrun:
            job_size = int(os.environ["WORLD_SIZE"])
            if world_size != job_size:
                return f"world size {world_size} differs from this torchrun job's {job_size}"
            return None
        if self.plan.device == "cuda" and world_size > self.plan.gpu_count:
            return f"world size {world_size} needs {world_size} GPUs; {self.plan.gpu_count} visible"
        return None

    def executor(self, world_size: int) -> Executor:
        from . import fingerprint
        from .pool import InProcessGroup, RankPool

        current = self._executors.get(world_size)
        if current is not None and not current.broken:
            return current
        self._executors.pop(world_size, None)
        if self.torchrun:
            current = InProcessGroup(
                self.plan.device, self.options.timeout_s, self.options.startup_timeout_s
            )
        else:
            self.prepare()
            # One pool at a time: pools of several sizes would share the same GPUs.
            self.close()
            current = RankPool(
                world_size,
                self.plan.device,
                self.options.timeout_s,
                self.options.startup_timeout_s,
            ).start()
            self.pool_starts += 1
        self._executors[world_size] = current
        if not self.store.machine:
            self.store.machine = current.run(fingerprint.collect)[0]
        return current

    def prepare(self) -> None:
        """Before the first pool: sweep what killed sessions left, and start the fork server
        the pools' ranks come from (`pool.start_fork_server`). Once; nothing under torchrun."""
        if self.torchrun or self._prepared:
            return
        from .leftovers import sweep_stale_resources
        from .pool import start_fork_server

        self._prepared = True
        self.swept = [str(p) for p in sweep_stale_resources()]
        start_fork_server()

    def call(self, world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(ctx, *args) on every rank; RankFailure when any rank fails (a broken pool is
        dropped here, so the next call starts a fresh one)."""
        from .pool import RankFailure

        executor = self.executor(world_size)
        try:
            return executor.run(fn, *args)
        except RankFailure:
            if executor.broken:
                self._executors.pop(world_size, None)
            raise

    def agree(self, world_size: int, value: Any) -> Any:
        """Under torchrun, rank 0's `value` on every rank: each rank decides session-end
        work from its own copy of the results, and one differing float must not make one
        rank measure a size the others do not. Elsewhere `value` itself."""
        if not self.torchrun:
            return value
        executor = self.executor(world_size)
        return executor.ctx.all_gather_object(value)[0]  # type: ignore[attr-defined]

    def close(self) -> None:
        for world_size, executor in list(self._executors.items()):
            try:
                executor.close()
            finally:
                del self._executors[world_size]

    # ---- availability and work -----------------------------------------------------------

    def refusal(self, variant: Variant, world_size: int) -> str | None:
        """Reasons decided here, before any rank is asked (so multicast is never tried)."""
        limits = variant.limits(world_size)
        if limits.device != self.plan.device:
            return f"a {limits.device} backend; this session runs on {self.plan.device}"
        if limits.needs_multicast and (switches := multicast_disabled_by()):
            return f"needs NVLink multicast, which is off here ({', '.join(switches)})"
        if reason := limits.world_size_refusal(world_size):
            return reason
        return self.cannot_start(world_size)

    def known_availability(self, target: Target) -> Availability:
        """Availability as far as it is known without asking any rank; an engine refusal
        is recorded at once, so the matrix lists it even though no test of it runs."""
        known = self.store.availability.get((target.backend, target.world_size))
        if known is not None:
            return known
        variant = self.plan.variant(target.backend)
        reason = self.refusal(variant, target.world_size)
        if reason is None:
            return Availability(variant.name, target.world_size, True)
        limits = variant.limits(target.world_size).as_dict()
        refused = Availability(variant.name, target.world_size, False, reason, limits)
        self.store.record_availability(refused)
        return refused

    def availability(self, variant: Variant, world_size: int) -> Availability:
        """Availability agreed by every rank's probe (asked once per session)."""
        from .jobs import vote_availability

        key = (variant.name, world_size)
        known = self.store.availability.get(key)
        if known is not None:
            return known
        reason = self.refusal(variant, world_size)
        if reason is None:
            answers = self.call(world_size, vote_availability, variant)[0]
            reason = "; ".join(f"rank {r}: {a}" for r, a in enumerate(answers) if a) or None
        result = Availability(
            variant.name,
            world_size,
            reason is None,
            reason or "",
            variant.limits(world_size).as_dict(),
        )
        self.store.record_availability(result)
        return result

    def work(self, target: Target) -> Work:
        from .jobs import Work

        variant = self.plan.variant(target.backend)
        largest = variant.limits(target.world_size).largest_rows(target.hidden, target.dtype)
        # A bounded backend is set up for its whole range, so the limit checks reuse it.
        rows = largest if largest is not None else self.needed_rows
        return Work(variant, target, max(rows, 1))

    def require(self, case: Case) -> Work:
        """The work for a case; CaseSkipped saying why when it cannot run here."""
        target = case.target
        variant = self.plan.variant(target.backend)
        availability = self.availability(variant, target.world_size)
        if not availability.available:
            raise CaseSkipped(
                f"{target.backend} unavailable at world size {target.world_size}: "
                f"{availability.reason}"
            )
        refusal = variant.limits(target.world_size).shape_refusal(
            case.batch_size, target.hidden, target.dtype, target.world_size
        )
        if refusal:
            raise CaseSkipped(f"outside {target.backend}'s limits: {refusal}")
        if broken := self.broken_cases.get((target, case.batch_size)):
            raise CaseSkipped(broken)
        return self.work(target)

    def call_case(self, case: Case, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """`call` for work at `case`; a hang or rank death is remembered for the case."""
        from .pool import RankFailure

        try:
            return self.call(case.target.world_size, fn, *args)
        except RankFailure as failure:
            if failure.pool_broken:
                self.broken_cases[(case.target, case.batch_size)] = (
                    f"{case.target.backend} hung or lost a rank at {case.batch_size} rows in "
                    f"{self.current_test or 'an earlier call'}: {failure.summary}"
                )
            raise

    def check_refusal(self, check: Check, target: Target) -> str | None:
        """Why `check` does not apply to `target` here, or None."""
        if check.needs_graphs:
            if self.plan.device != "cuda":
                return "CUDA graphs need a GPU; this session runs on the CPU"
            limits = self.plan.variant(target.backend).limits(target.world_size)
            if not limits.graph_capturable:
                return f"{target.backend} declares it cannot be captured in a CUDA graph"
        return None

    # ---- running -------------------------------------------------------------------------

    def run_check(self, check: Check, case: Case) -> CheckOutcome:
        """`check` at `case` on every rank. CaseSkipped, or RankFailure when a rank failed."""
        if reason := self.check_refusal(check, case.target):
            raise CaseSkipped(reason)
        work = self.require(case)
        reports = self.call_case(case, check.fn, work, case.batch_size, *check.args)
        problems = tuple(f"rank {r.rank}: {p}" for r in reports for p in r.problems)
        return CheckOutcome(check, case, problems, reports[0].engaged if reports else "")

    def measure(self, case: Case, job: Job, timing_plan: TimingPlan) -> Latency:
        """The job's latency at `case` alone. CaseSkipped, or RankFailure when the timing
        failed (a rank raised, or the outputs were wrong while being timed)."""
        from .pool import RankFailure

        outcome = self.measure_interleaved([case], job, timing_plan)
        if case in outcome.skipped:
            raise CaseSkipped(outcome.skipped[case])
        if case in outcome.failed:
            raise RankFailure(outcome.failed[case], {}, pool_broken=False)
        return outcome.latencies[0]

    def measure_interleaved(
        self, cases: Sequence[Case], job: Job, timing_plan: TimingPlan
    ) -> InterleavedOutcome:
        """Every case that can run here, timed together: interleaved rounds, every candidate's
        backend set up on the ranks at once (`timing.measure_interleaved`).

        The cases share a world size, hidden size, dtype and batch size. Each case ends up in
        exactly one of the outcome's latencies, skipped or failed: a candidate that fails
        costs the others nothing but time, because a failed round is taken apart (see
        `_time_together`).
        """
        from .pool import RankFailure

        outcome = InterleavedOutcome()
        runnable: list[tuple[Case, Work]] = []
        for case in _one_size(cases):
            try:
                runnable.append((case, self.require(case)))
            except CaseSkipped as skipped:
                outcome.skipped[case] = str(skipped)
            except RankFailure as failure:  # the availability vote failed on a rank
                outcome.failed[case] = str(failure)
        self._time_together(runnable, job, timing_plan, outcome)
        return outcome

    def _time_together(
        self,
        runnable: list[tuple[Case, Work]],
        job: Job,
        timing_plan: TimingPlan,
        outcome: InterleavedOutcome,
    ) -> None:
        """Time `runnable` together. When that fails, each is timed alone to find the ones
        that fail by themselves (recorded as failed), and the rest are timed together again.
        When every one passes alone, the failure belongs to the combination, which cannot
        be pinned on one of them: all are recorded as failed, each naming the others."""
        from . import timing
        from .pool import RankFailure

        if not runnable:
            return
        first = runnable[0][0]
        world_size, rows = first.target.world_size, first.batch_size

        def time_works(works: list[Work]) -> timing.InterleavedTiming:
            return self.call(world_size, timing.measure_interleaved, works, rows, job, timing_plan)[
                0
            ]

        def time_alone(case: Case, work: Work) -> timing.InterleavedTiming:
            # Through call_case: a candidate that hangs or kills a rank alone is on record,
            # and the rest of its tests at this size are skipped.
            return self.call_case(case, timing.measure_interleaved, [work], rows, job, timing_plan)[
                0
            ]

        try:
            if len(runnable) == 1:
                result = time_alone(*runnable[0])
            else:
                result = time_works([w for _, w in runnable])
        except RankFailure as failure:
            if len(runnable) == 1:
                outcome.failed[first] = str(failure)
                return
            alone_ok = []
            for case, work in runnable:
                try:
                    time_alone(case, work)
                except RankFailure as own:
                    outcome.failed[case] = str(own)
                else:
                    alone_ok.append((case, work))
            if len(alone_ok) < len(runnable):
                self._time_together(alone_ok, job, timing_plan, outcome)
                return
            for case, _ in runnable:
                others = ", ".join(c.target.backend for c, _ in runnable if c != case)
                outcome.failed[case] = (
                    f"passed when timed alone, failed when timed together with {others}:\n{failure}"
                )
            return
        for (case, _), timed in zip(runnable, result.candidates, strict=True):
            if timed.problems:
                outcome.failed[case] = "wrong results while being timed [{}]:\n{}".format(
                    timed.engaged, "\n".join(timed.problems)
                )
                continue
            outcome.latencies.append(
                Latency(
                    case=case,
                    job=job,
                    samples_us=timed.samples_us,
                    ops_per_sample=result.ops_per_sample,
                    clock=timed.clock,  # type: ignore[arg-type]
                    message_bytes=result.message_bytes,
                    engaged=timed.engaged,
                )
            )


def standalone_engine(
    device: str,
    backends: Sequence[str],
    world_size: int,
    hidden: int,
    dtype: str,
    batch_sizes: Sequence[int],
    timeout_s: float,
) -> Engine:
    """An engine outside pytest (the benchmarks): the built-in backends, one world size,
    hidden size and dtype, and the batch sizes it will be asked about (set-ups hold the
    largest). Close it when done."""
    from pathlib import Path

    from .options import Options
    from .plan import Plan
    from .registry import BackendRegistry
    from .results import ResultStore

    registry = BackendRegistry()
    registry.load_builtins()
    options = Options(
        backends=tuple(backends),
        device=device,
        world_sizes=(world_size,),
        hidden_sizes=(hidden,),
        batch_sizes=tuple(batch_sizes),
        dtypes=(dtype,),
        output_dir=Path("allreduce-results"),  # never written: no session, no artifacts
        timeout_s=timeout_s,
        baseline=None,
        save_baseline=None,
    )
    plan = Plan.build(options, registry)
    return Engine(options, plan, ResultStore(plan.device))


@dataclass
class InterleavedOutcome:
    """What timing several candidates at one size together gave, per case."""

    latencies: list[Latency] = field(default_factory=list)  # the measured cases, in input order
    skipped: dict[Case, str] = field(default_factory=dict)  # why each could not run here
    failed: dict[Case, str] = field(default_factory=dict)  # the report, per failed case

    def cases(self) -> list[Case]:
        return [lat.case for lat in self.latencies] + [*self.skipped, *self.failed]


def _one_size(cases: Sequence[Case]) -> list[Case]:
    """The cases, refused unless they share a world size, hidden, dtype and batch size."""
    shapes = {(c.target.group_key, c.batch_size) for c in cases}
    if len(shapes) > 1:
        raise ValueError(f"interleaved timing needs one shape, got {sorted(shapes)}")
    if len(set(cases)) != len(cases):
        raise ValueError("interleaved timing got the same case twice")
    return list(cases)
