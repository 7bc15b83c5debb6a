"""AllreduceSession: the plugin object that owns one pytest session's allreduce work.

Registered with pytest's plugin manager at configure time (as pytest's junitxml, xdist's
DSession and pytest-benchmark's session are), it parametrises the suites from the plan and
the check table, orders the items, records every verdict from the test reports, and at
session end selects, bisects, writes the artifacts and gates. The rank pools and the rank
functions are the engine's (`engine.Engine`). Under pytest-xdist the workers only record and
hand their results over; the controller does the session-end work (`xdist_roles`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .checktable import CHECKS, Check, checks_at_each_size, checks_of, suite_rank
from .engine import CaseSkipped, Engine
from .model import JOBS, Case, GroupKey, Job, Latency, Target, Verdict
from .results import ResultStore

if TYPE_CHECKING:
    from collections.abc import Generator

    from .accuracy.runner import AccuracyRunner
    from .engine import InterleavedOutcome
    from .options import Options
    from .outputdir import OutputDir
    from .plan import Plan
    from .registry import BackendRegistry
    from .selection import Selection, Unsettled
    from .timing import TimingPlan
    from .xdist_roles import Role

PLUGIN_NAME = "allreduce-session"
# Test ids of the checks session-end work runs start with one of these.
SESSION_END_STEPS: tuple[str, ...] = ("bisection", "settling", "routed size")


@dataclass(frozen=True)
class CheckCall:
    """One parametrisation of a suite test: a check of the table at one case."""

    check: Check
    case: Case

    @property
    def label(self) -> str:
        return f"{self.check.name}-{self.case.label}"


@dataclass(frozen=True)
class AccuracyCall:
    """One parametrisation of the accuracy suite: a backend (or an endpoint) at a world size."""

    name: str
    world_size: int
    endpoint: bool = False

    @property
    def label(self) -> str:
        return f"endpoint-{self.name}" if self.endpoint else f"{self.name}-tp{self.world_size}"


@dataclass(frozen=True)
class LatencyCall:
    """One parametrisation of the latency suite: every runnable candidate at one size, timed
    together so that drift over the run hits them alike."""

    key: GroupKey
    batch_size: int
    targets: tuple[Target, ...]

    @property
    def cases(self) -> list[Case]:
        return [t.at(self.batch_size) for t in self.targets]

    @property
    def label(self) -> str:
        return f"{self.key.label}-bs{self.batch_size}"


def latency_verdicts(outcome: InterleavedOutcome, test_id: str) -> dict[Case, Verdict]:
    """One latency verdict per case of an interleaved timing, each against its own backend."""
    verdicts = {lat.case: Verdict("latency", "passed", "", test_id) for lat in outcome.latencies}
    for case, why in outcome.skipped.items():
        verdicts[case] = Verdict("latency", "skipped", why, test_id)
    for case, report in outcome.failed.items():
        verdicts[case] = Verdict("latency", "failed", report[-2000:], test_id)
    return verdicts


@dataclass
class SessionReport:
    """What the terminal summary prints at the end."""

    artifacts: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # known before any test runs


class AllreduceSession:
    def __init__(
        self,
        options: Options,
        plan: Plan,
        registry: BackendRegistry,
        config: pytest.Config | None = None,
        role: Role = "single",
    ) -> None:
        self.options = options
        self.plan = plan
        self.registry = registry
        self.config = config
        # "worker": an xdist worker, which runs tests and hands its results to the
        # controller; "controller": runs no test, does the session-end work from all
        # workers' results (xdist_roles); "single": both, in this one process.
        self.role = role
        self.store = ResultStore(plan.device)
        self.engine = Engine(options, plan, self.store)
        self.report = SessionReport()
        self._timing_plan: TimingPlan | None = None
        self.output: OutputDir | None = None  # claimed once allreduce tests are collected
        self._accuracy: AccuracyRunner | None = None
        self._progress_shown = False
        # Per latency test (node id): each candidate's verdict, until its report is made.
        self._latency_verdicts: dict[str, dict[Case, Verdict]] = {}
        for variant in plan.variants:
            self.store.declare(variant.info)
        self._planned_targets = set(plan.targets())

    @property
    def torchrun(self) -> bool:
        return self.engine.torchrun

    @property
    def is_writer(self) -> bool:
        """Only one process writes artifacts: rank 0 under torchrun, never an xdist worker
        (the controller writes from every worker's results), else this one."""
        if self.role == "worker":
            return False
        return not self.torchrun or int(os.environ["RANK"]) == 0

    def device_name(self) -> str:
        """The raw device name of the ranks (``torch.cuda.get_device_name()`` or "cpu")."""
        from .fingerprint import device_name

        return device_name(self.store.machine) if self.store.machine else "cpu"

    def progress(self, message: str) -> None:
        """A line on the terminal during session-end work, which can take a while after the
        last test; none under -q, and only from the process that writes."""
        if self.config is None or not self.is_writer or self.config.get_verbosity() < 0:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        # Inside a test (the accuracy suite's verdicts) output is captured: step around it.
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if not self._progress_shown:
                # Ends the test progress line, which xdist's compact output leaves open.
                reporter.write_line("")
                self._progress_shown = True
            reporter.write_line(f"allreduce: {message}")

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

    @property
    def accuracy(self) -> AccuracyRunner:
        if self._accuracy is None:
            from .accuracy.runner import AccuracyRunner

            self._accuracy = AccuracyRunner(self.options, self.engine, self.registry)
        return self._accuracy

    def accuracy_calls(self) -> list[AccuracyCall]:
        """The reference first (every comparison needs its run), then every other backend
        of the plan that can run here; with endpoints, the endpoints instead."""
        if self.options.gsm8k_endpoints:
            names = [n for n, _ in self.options.gsm8k_endpoints]
            return [AccuracyCall(n, 0, endpoint=True) for n in names]
        reference = self.options.gsm8k_reference or (
            "nccl" if self.plan.device == "cuda" else "gloo"
        )
        calls = []
        for ws in self.plan.world_sizes:
            names = [reference] + [
                t.backend
                for t in self.runnable_targets()
                if t.world_size == ws and t.backend != reference
            ]
            calls += [AccuracyCall(n, ws) for n in dict.fromkeys(names)]
        return calls

    def latency_calls(self) -> list[LatencyCall]:
        """One call per (world size, hidden, dtype, batch size), candidates in plan order."""
        by_key: dict[GroupKey, list[Target]] = {}
        for target in self.runnable_targets():
            by_key.setdefault(target.group_key, []).append(target)
        return [
            LatencyCall(key, bs, tuple(targets))
            for key, targets in by_key.items()
            for bs in self.plan.batch_sizes
        ]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "allreduce_accuracy" in metafunc.fixturenames:
            calls = self.accuracy_calls()
            metafunc.parametrize(
                "allreduce_accuracy", calls, indirect=True, ids=[c.label for c in calls]
            )
        elif "allreduce_check" in metafunc.fixturenames:
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
        elif "allreduce_latency" in metafunc.fixturenames:
            latency_calls = self.latency_calls()
            metafunc.parametrize(
                "allreduce_latency",
                latency_calls,
                indirect=True,
                ids=[c.label for c in latency_calls],
            )
        elif "allreduce_case" in metafunc.fixturenames:
            cases = [t.at(bs) for t in self.runnable_targets() for bs in self.plan.batch_sizes]
            metafunc.parametrize("allreduce_case", cases, ids=[c.label for c in cases])

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Group by world size so each pool starts once, and check before timing.
        def key(item: pytest.Item) -> tuple[int, int]:
            case = _item_case(item)
            latency = _item_param(item, "allreduce_latency")
            accuracy = _item_param(item, "allreduce_accuracy")
            suite = _item_suite(item)
            rank = suite_rank(suite) if suite else len(CHECKS)
            if isinstance(latency, LatencyCall):
                return (latency.key.world_size, rank)
            ws = case.target.world_size if case else getattr(accuracy, "world_size", 0)
            return (ws, rank)

        items.sort(key=key)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Claim the output dir once this session will run allreduce tests (never for a
        project that only has the plugin installed): a second session writing the same dir
        is a usage error naming the first one's pid. Then start what the first pool needs
        (`Engine.prepare`), while the first test is still being set up."""
        if self.is_writer and any(_item_suite(item) for item in session.items):
            self.claim_output_dir()
            if not session.config.option.collectonly:
                self.engine.prepare()

    def claim_output_dir(self) -> None:
        from .outputdir import OutputDir, OutputDirError

        try:
            self.output = OutputDir.claim(self.options.output_dir)
        except OutputDirError as exc:
            raise pytest.UsageError(
                f"--allreduce-output-dir={self.options.output_dir}: {exc}"
            ) from None
        self.report.notes += self.output.repairs

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
        latency = _item_param(item, "allreduce_latency")
        if isinstance(latency, LatencyCall) and suite is not None and decisive:
            self._record_latency_item(latency, _report_verdict(suite, report, item.nodeid))
        elif case is not None and suite is not None and decisive:
            self.record_verdict(case, _report_verdict(suite, report, item.nodeid))
        return report

    def _record_latency_item(self, call: LatencyCall, item_verdict: Verdict) -> None:
        """Each candidate's own verdict; the item's outcome where the test ended before the
        timing gave one, or failed outside it."""
        verdicts = self._latency_verdicts.pop(item_verdict.test_id, {})
        failed_outside = item_verdict.outcome == "failed" and not any(
            v.outcome == "failed" for v in verdicts.values()
        )
        for case in call.cases:
            verdict = verdicts.get(case)
            if verdict is None or (failed_outside and verdict.outcome == "passed"):
                verdict = item_verdict
            self.record_verdict(case, verdict)

    def measure_together(self, cases: list[Case], job: Job, test_id: str) -> InterleavedOutcome:
        """Time the cases interleaved (`Engine.measure_interleaved`), record every latency,
        and keep each case's verdict for the test's report (under `test_id`)."""
        outcome = self.engine.measure_interleaved(cases, job, self.timing_plan)
        for latency in outcome.latencies:
            self.record_latency(latency)
        self._latency_verdicts[test_id] = latency_verdicts(outcome, test_id)
        return outcome

    def record_verdict(self, case: Case, verdict: Verdict) -> None:
        if case.target in self._planned_targets:
            self.store.record_verdict(case, verdict)

    def record_accuracy(self, verdict: Any) -> None:
        """An accuracy verdict: kept for the artifacts; a failure disqualifies the backend
        at that world size for every shape (a wrong answer is not tied to one size)."""
        summary = verdict.summary()
        self.store.accuracy[(verdict.backend, verdict.world_size)] = summary
        self.store.accuracy_model = self.accuracy.model_info()
        # A whole GSM8K run takes minutes per backend: say each verdict as it comes.
        identical = {True: ", token-identical", False: ", not token-identical"}.get(
            summary.get("token_identical"), ""
        )
        p = summary.get("mcnemar_p")
        mcnemar = "" if p is None else f", McNemar p {p:.3g}"
        # In-process runs say where the time went; an endpoint's run has only its wall time.
        split = (
            f"prefill {summary['prefill_s']:.1f} s, {summary['decode_steps']} decode steps "
            f"{summary['decode_s']:.1f} s, "
            if summary.get("decode_steps")
            else ""
        )
        self.progress(
            f"accuracy tp{verdict.world_size} {verdict.backend}: strict "
            f"{summary['accuracy_strict']:.3f}, flexible {summary['accuracy_flexible']:.3f} "
            f"(n={summary['n']}){identical}{mcnemar}, {summary['questions_per_s']:.1f} q/s "
            f"({split}wall {summary['seconds']:.1f} s), {summary['verdict']}"
        )
        if not verdict.passed:
            self.store.disqualify(
                verdict.backend, verdict.world_size, "accuracy: " + "; ".join(verdict.problems)
            )

    def record_latency(self, latency: Latency) -> None:
        self.store.record_latency(latency)

    # ---- session end ---------------------------------------------------------------------

    # A tryfirst wrapper, so its first half runs before every other plugin's session end:
    # before pytest-benchmark's (which saves and tabulates the records handed to it here,
    # bisection included) and, in an xdist worker, before xdist's own (which sends the
    # worker's output to the controller).
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(
        self, session: pytest.Session, exitstatus: int
    ) -> Generator[None, None, None]:
        if self.role == "worker":
            from .xdist_roles import export_results

            export_results(session.config, self)
            return (yield)
        try:
            report = self.finish(int(exitstatus), session.testsfailed)
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
        return (yield)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        from .summary import summary_lines

        if lines := summary_lines(self):
            terminalreporter.section("allreduce")
            for line in lines:
                terminalreporter.write_line(line)

    def pytest_unconfigure(self) -> None:
        try:
            self.engine.close()
        finally:
            if self.output is not None:
                self.output.release()

    def finish(self, exitstatus: int = 0, tests_failed: int = 0) -> SessionReport:
        """Select, bisect, write artifacts, gate. Only the writer process does the writing.

        Under torchrun every rank takes part in the bisection (its measurements are
        collective), so every rank runs the selection; only rank 0 writes. A shape whose
        planned cases were not all covered, or a session that did not pass, writes
        `.partial` files beside the complete ones (`coverage.py`).
        """
        from . import artifacts, gate
        from .config import device_label
        from .coverage import coverage, session_gaps

        if not self.store.latencies and not self.store.accuracy:
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
        self._publish_benchmarks(selections)
        if selections and (missing := self.store.missing_suites()):
            self.report.notes.append(
                "no backend is eligible to win: the gating suite(s) "
                f"{', '.join(missing)} did not run in this session"
            )
        if self.output is None and self.role == "controller":
            # An xdist controller collects no items: it claims the dir when it writes.
            try:
                self.claim_output_dir()
            except pytest.UsageError as exc:
                self.report.errors.append(f"no artifacts written: {exc}")
        if self.output is None:
            return self.report
        self.report.notes += [f"removed {p}, left by a killed session" for p in self.engine.swept]
        label = device_label(self.device_name())
        count = artifacts.planned_file_count(selections)
        self.progress(f"writing {count} artifacts to {self.options.output_dir}")
        # Every artifact of this run is staged, then swapped in together: the output dir
        # never holds files of two runs, whatever kills this process when.
        with self.output.stage() as staging:
            if selections:
                covered = coverage(self.plan, self.store, session_gaps(exitstatus, tests_failed))
                written = artifacts.write_artifacts(
                    self.store,
                    selections,
                    staging.root,
                    label,
                    coverage=covered,
                    pytest_config=self.config,
                )
                self.report.notes += written.notes
            artifacts.write_accuracy(self.store, staging.root)
            self.report.artifacts += staging.commit()
        if self.options.save_baseline is not None:
            gate.save_baseline(self.store, self.options.save_baseline)
            self.report.artifacts.append(self.options.save_baseline)
        if self.options.baseline is not None:
            self.progress(f"latency gate against {self.options.baseline}")
            outcome = gate.check_baseline(self.store, self.options.baseline)
            self.report.gate_failures += [str(r) for r in outcome.regressions]
            self.report.notes += [str(n) for n in outcome.notes]
        return self.report

    def _select(self, key: GroupKey) -> Selection:
        from .selection import select_with_bisection

        timed = {c.target.backend for c, _ in self.store.latencies if c.target.group_key == key}
        self.progress(
            f"selection for {_group_label(key)}: {len(self.store.batch_sizes(key))} sizes, "
            f"{len(timed)} backends"
        )

        def agree(points: list[int]) -> list[int]:
            agreed = self.engine.agree(key.world_size, points)
            if agreed:
                count = f"{len(agreed)} size{'s' if len(agreed) > 1 else ''}"
                sizes = ", ".join(map(str, agreed))
                self.progress(f"bisection: {count} for {_group_label(key)} ({sizes})")
            return agreed

        return select_with_bisection(
            self.store,
            key,
            measure_size=lambda rows: self.measure_size(key, rows),
            agree=agree,
            settle=lambda unsettled: self.settle_sizes(key, unsettled),
        )

    def settle_sizes(self, key: GroupKey, unsettled: list[Unsettled]) -> list[int]:
        """Time the two entries of each unsettled size together again and add the samples
        to theirs, while they hold fewer than SETTLING_MAX_FACTOR x the plan's samples;
        returns the sizes that got samples."""
        from .selection import SELECTION_JOB, SETTLING_MAX_FACTOR

        cap = SETTLING_MAX_FACTOR * self.timing_plan.samples
        todo = [(u.rows, u.variants) for u in unsettled if u.samples < cap]
        todo = self.engine.agree(key.world_size, todo)
        if todo:
            sizes = ", ".join(str(rows) for rows, _ in todo)
            self.progress(f"settling: {len(todo)} for {_group_label(key)} ({sizes})")
        settled = []
        for rows, variants in todo:
            cases = [
                Target(v, key.world_size, key.hidden, key.dtype).at(rows)
                for v in dict.fromkeys(variants)
            ]
            outcome = self.engine.measure_interleaved(cases, SELECTION_JOB, self.timing_plan)
            for latency in outcome.latencies:
                earlier = self.store.latency(latency.case, SELECTION_JOB)
                if earlier is not None:
                    latency = replace(
                        latency, samples_us=[*earlier.samples_us, *latency.samples_us]
                    )
                self.record_latency(latency)
            for case, verdict in latency_verdicts(outcome, "settling").items():
                self.record_verdict(case, verdict)
            if outcome.latencies:
                settled.append(rows)
        return settled

    def _publish_benchmarks(self, selections: dict[GroupKey, Selection]) -> None:
        """Every latency of the session, as records of pytest-benchmark's own session."""
        if self.config is None:
            return
        from .artifacts.benchmark import benchmark_records
        from .benchmarking import publish

        try:
            records = benchmark_records(self.store, selections, self.device_name())
        except ImportError:
            return  # pytest-benchmark is not installed
        if publish(self.config, records):
            self.progress(f"pytest-benchmark: {len(records)} records")

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
        # The keys the config will hold: a server routes every token count to one of them,
        # and between two keys that run the same backend nothing changes.
        winners = {bs: selection.choices[bs].backend_name for bs in selection.config_keys()}
        # The plan's own sizes bound the unmeasured gaps (bisection's sizes only split a gap
        # the plan already had, and each is checked where it was added).
        for rows, routed_to in sizes_to_check(winners, end, self.plan.batch_sizes):
            winner = selection.choices[routed_to].backend_name
            case = Target(winner, key.world_size, key.hidden, key.dtype).at(rows)
            if not self._checked(case):
                todo.append((winner, rows))
        todo = self.engine.agree(key.world_size, todo)
        if todo:
            self.progress(f"routed sizes: {len(todo)} checked for {_group_label(key)}")
        for winner, rows in todo:
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
        size, recorded under its own suite, then the candidates that passed all of them, timed
        together."""
        eligible = []
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
            if self.store.eligible(case):
                eligible.append(case)
        if not eligible:
            return
        for job in JOBS:
            self.measure_together(eligible, job, "bisection")
            for case, verdict in self._latency_verdicts.pop("bisection").items():
                self.record_verdict(case, verdict)

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
            self.record_verdict(case, Verdict(check.suite, "failed", str(failure)[:2000], test_id))
            return
        verdict = Verdict(
            check.suite,
            "passed" if outcome.passed else "failed",
            "" if outcome.passed else outcome.describe()[:2000],
            test_id,
        )
        self.record_verdict(case, verdict)


def _group_label(key: GroupKey) -> str:
    return f"tp{key.world_size} h{key.hidden} {key.dtype}"


def _report_verdict(suite: str, report: pytest.TestReport, test_id: str) -> Verdict:
    detail = report.longreprtext[-2000:] if report.failed else ""
    if report.skipped and isinstance(report.longrepr, tuple):
        detail = str(report.longrepr[2])
    return Verdict(suite, report.outcome, detail, test_id)  # type: ignore[arg-type]


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
    if isinstance(_item_param(item, "allreduce_accuracy"), AccuracyCall):
        return "accuracy"
    mark = item.get_closest_marker("allreduce_suite")
    return str(mark.args[0]) if mark else None
