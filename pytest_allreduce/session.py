"""AllreduceSession: the plugin object that owns one pytest session's allreduce work.

Registered with pytest's plugin manager at configure time (as pytest's junitxml, xdist's
DSession and pytest-benchmark's session are), it parametrises the suites from the plan and
the check table, orders the items, records every verdict from the test reports, and at
session end selects, bisects, writes the artifacts and gates. The rank pools and the rank
functions are the engine's (`engine.Engine`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .checktable import CHECKS, Check, checks_at_each_size, checks_of, suite_rank
from .engine import CaseSkipped, Engine
from .model import JOBS, Case, GroupKey, Latency, Target, Verdict
from .results import ResultStore

if TYPE_CHECKING:
    from collections.abc import Generator

    from .options import Options
    from .plan import Plan
    from .registry import BackendRegistry
    from .selection import Selection
    from .timing import TimingPlan

PLUGIN_NAME = "allreduce-session"
# Test ids of the checks session-end work runs start with one of these.
SESSION_END_STEPS: tuple[str, ...] = ("bisection", "routed size")


@dataclass(frozen=True)
class CheckCall:
    """One parametrisation of a suite test: a check of the table at one case."""

    check: Check
    case: Case

    @property
    def label(self) -> str:
        return f"{self.check.name}-{self.case.label}"


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
        self.engine = Engine(options, plan, self.store)
        self.report = SessionReport()
        self._timing_plan: TimingPlan | None = None
        for variant in plan.variants:
            self.store.declare(variant.info)
        self._planned_targets = set(plan.targets())

    @property
    def torchrun(self) -> bool:
        return self.engine.torchrun

    @property
    def is_writer(self) -> bool:
        """Only one process writes artifacts: rank 0 under torchrun, else this one."""
        return not self.torchrun or int(os.environ["RANK"]) == 0

    @property
    def timing_plan(self) -> TimingPlan:
        if self._timing_plan is None:
            from .timing import TimingPlan

            self._timing_plan = TimingPlan.for_device(self.plan.device)
        return self._timing_plan

    # ---- collection ----------------------------------------------------------------------

    def runnable_targets(self) -> list[Target]:
        """Targets that can run here as far as is known without asking a rank (another
        device, multicast off, world size): the others get no test items at all, rather
        than thousands of skips; the backend matrix lists each with its reason."""
        return [t for t in self.plan.targets() if self.engine.known_availability(t).available]

    def check_calls(self, suite: str) -> list[CheckCall]:
        calls = []
        for check in checks_of(suite):
            for target in self.runnable_targets():
                if check.sizes == "limits":
                    limits = self.plan.variant(target.backend).limits(target.world_size)
                    largest = limits.largest_rows(target.hidden, target.dtype)
                    if largest is None and limits.min_rows <= 1:
                        continue  # nothing to step around
                    calls.append(CheckCall(check, target.at(largest or limits.min_rows)))
                    continue
                listed = check.sizes == "listed"
                sizes = sorted({*([] if listed else self.plan.batch_sizes), *check.extra_rows})
                calls += [CheckCall(check, target.at(rows)) for rows in sizes]
        return calls

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "allreduce_check" in metafunc.fixturenames:
            mark = metafunc.definition.get_closest_marker("allreduce_suite")
            if mark is None:
                raise pytest.UsageError(
                    f"{metafunc.definition.nodeid} uses allreduce_check without an "
                    "allreduce_suite(name) marker"
                )
            calls = self.check_calls(mark.args[0])
            metafunc.parametrize(
                "allreduce_check", calls, indirect=True, ids=[c.label for c in calls]
            )
        elif "allreduce_case" in metafunc.fixturenames:
            cases = [t.at(bs) for t in self.runnable_targets() for bs in self.plan.batch_sizes]
            metafunc.parametrize("allreduce_case", cases, ids=[c.label for c in cases])

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Group by world size so each pool starts once, and check before timing.
        def key(item: pytest.Item) -> tuple[int, int]:
            case = _item_case(item)
            mark = item.get_closest_marker("allreduce_suite")
            suite = suite_rank(mark.args[0]) if mark else len(CHECKS)
            return (case.target.world_size if case else 0, suite)

        items.sort(key=key)

    # ---- verdicts ------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # Named in the reason the engine gives for skipping the rest of a backend's work at
        # a size where this test hung or lost a rank.
        self.engine.current_test = item.nodeid

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        case = _item_case(item)
        suite = _item_suite(item)
        decisive = report.when == "call" or (report.when == "setup" and not report.passed)
        if case is not None and suite is not None and decisive:
            detail = report.longreprtext[-2000:] if report.failed else ""
            if report.skipped and isinstance(report.longrepr, tuple):
                detail = str(report.longrepr[2])
            verdict = Verdict(suite, report.outcome, detail, item.nodeid)  # type: ignore[arg-type]
            self.record_verdict(case, verdict)
        return report

    def record_verdict(self, case: Case, verdict: Verdict) -> None:
        if case.target in self._planned_targets:
            self.store.record_verdict(case, verdict)

    def record_latency(self, latency: Latency) -> None:
        self.store.record_latency(latency)

    # ---- session end ---------------------------------------------------------------------

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        try:
            report = self.finish()
        except Exception as exc:  # artifacts failing must fail the run, loudly
            self.report.errors.append(f"{type(exc).__name__}: {exc}")
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
            raise
        if report.gate_failures and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        # A failed check fails the run wherever it ran: tests fail by themselves, checks
        # that session-end work ran (bisection, routed sizes) fail it here.
        if self.store.disqualified() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.store.availability:
            return
        from .summary import summary_lines

        terminalreporter.section("allreduce")
        for line in summary_lines(self):
            terminalreporter.write_line(line)

    def pytest_unconfigure(self) -> None:
        self.engine.close()

    def finish(self) -> SessionReport:
        """Select, bisect, write artifacts, gate. Only the writer process does the writing.

        Under torchrun every rank takes part in the bisection (its measurements are
        collective), so every rank runs the selection; only rank 0 writes.
        """
        from . import artifacts, gate
        from .config import device_label
        from .fingerprint import device_name

        if not self.store.latencies:
            return self.report
        selections: dict[GroupKey, Selection] = {}
        measured = set(self.store.group_keys())
        for ws in self.plan.world_sizes:  # plan order: the first planned dtype comes first
            for hidden in self.plan.hidden_sizes:
                for dtype in self.plan.dtypes:
                    if (key := GroupKey(ws, hidden, dtype)) in measured:
                        selections[key] = self._select_covered(key)
        for target, why in self.store.disqualified().items():
            self.report.notes.append(f"{target.label} is kept out of the config: {why}")
        if failed := self.session_end_failures():
            self.report.errors.append(
                f"{len(failed)} check(s) failed in session-end work: " + "; ".join(failed[:5])
            )
        if not self.is_writer:
            return self.report
        if missing := self.store.missing_suites():
            self.report.notes.append(
                "no backend is eligible to win: the gating suite(s) "
                f"{', '.join(missing)} did not run in this session"
            )
        label = device_label(device_name(self.store.machine)) if self.store.machine else "cpu"
        written = artifacts.write_artifacts(self.store, selections, self.options.output_dir, label)
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

    def _select(self, key: GroupKey) -> Selection:
        from .selection import select_with_bisection

        return select_with_bisection(
            self.store,
            key,
            measure_size=lambda rows: self.measure_size(key, rows),
            agree=lambda points: self.engine.agree(key.world_size, points),
        )

    def _select_covered(self, key: GroupKey) -> Selection:
        """Select (with bisection), then check the sizes the config routes to each winner;
        while that disqualifies someone, select again without them."""
        chosen = self._select(key)
        # Each round that changes anything disqualifies a winner for good: few rounds.
        for _ in self._planned_targets:
            before = set(self.store.disqualified())
            self.check_routed_sizes(key, chosen)
            if set(self.store.disqualified()) == before:
                break
            chosen = self._select(key)
        return chosen

    def check_routed_sizes(self, key: GroupKey, selection: Selection) -> None:
        """Every check of the table that runs at each size, at the sizes the config routes
        to each winner that nothing has checked yet (`routing.sizes_to_check`): the
        config covers every size up to the largest planned one, not only its keys."""
        from .routing import sizes_to_check

        end = max(self.plan.batch_sizes)
        todo = []
        winners = {bs: choice.backend_name for bs, choice in selection.choices.items()}
        for rows, routed_to in sizes_to_check(winners, end):
            winner = selection.choices[routed_to].backend_name
            case = Target(winner, key.world_size, key.hidden, key.dtype).at(rows)
            if not self._checked(case):
                todo.append((winner, rows))
        for winner, rows in self.engine.agree(key.world_size, todo):
            case = Target(winner, key.world_size, key.hidden, key.dtype).at(rows)
            for check in checks_at_each_size():
                self._record_check(case, check, "routed size")

    def _checked(self, case: Case) -> bool:
        """Every suite of the each-size checks that applies here has a verdict at `case`
        (of any outcome)."""
        recorded = self.store.verdicts.get(case, {})
        return all(
            check.suite in recorded
            for check in checks_at_each_size()
            if self.engine.check_refusal(check, case.target) is None
        )

    def session_end_failures(self) -> list[str]:
        """The failed checks that session-end work recorded, as "test id at case"."""
        return [
            f"{v.test_id} at {case.label}"
            for case, suites in self.store.verdicts.items()
            for verdicts in suites.values()
            for v in verdicts
            if v.outcome == "failed" and v.test_id.startswith(SESSION_END_STEPS)
        ]

    def measure_size(self, key: GroupKey, rows: int) -> None:
        """At a size between two measured ones: every check of the table that runs at each
        size, recorded under its own suite, then the timing where all of them passed."""
        from .pool import RankFailure

        for target in sorted(self._planned_targets):
            if target.group_key != key or not self.store.server_type(target.backend):
                continue
            availability = self.store.availability.get((target.backend, target.world_size))
            if availability is None or not availability.available:
                continue
            if self.store.disqualification(target) is not None:
                continue  # it cannot win anywhere in this config: nothing to learn here
            case = target.at(rows)
            for check in checks_at_each_size():
                self._record_check(case, check, "bisection")
            if not self.store.eligible(case):
                continue
            for job in JOBS:
                try:
                    self.record_latency(self.engine.measure(case, job, self.timing_plan))
                except CaseSkipped:
                    break
                except RankFailure as failure:
                    verdict = Verdict(
                        "latency", "failed", str(failure)[:2000], "bisection::latency"
                    )
                    self.record_verdict(case, verdict)
                    break

    def _record_check(self, case: Case, check: Check, step: str) -> None:
        from .pool import RankFailure

        test_id = f"{step}::{check.label}"
        self.engine.current_test = test_id
        try:
            outcome = self.engine.run_check(check, case)
        except CaseSkipped as skipped:
            self.record_verdict(case, Verdict(check.suite, "skipped", str(skipped), test_id))
            return
        except RankFailure as failure:
            self.record_verdict(
                case, Verdict(check.suite, "failed", str(failure)[:2000], test_id)
            )
            return
        verdict = Verdict(
            check.suite,
            "passed" if outcome.passed else "failed",
            "" if outcome.passed else outcome.describe()[:2000],
            test_id,
        )
        self.record_verdict(case, verdict)


def _item_param(item: pytest.Item, name: str) -> Any:
    params = getattr(item, "callspec", None)
    return params.params.get(name) if params is not None else None


def _item_case(item: pytest.Item) -> Case | None:
    call = _item_param(item, "allreduce_check")
    if isinstance(call, CheckCall):
        return call.case
    case = _item_param(item, "allreduce_case")
    return case if isinstance(case, Case) else None


def _item_suite(item: pytest.Item) -> str | None:
    call = _item_param(item, "allreduce_check")
    if isinstance(call, CheckCall):
        return call.check.suite
    mark = item.get_closest_marker("allreduce_suite")
    return str(mark.args[0]) if mark else None
