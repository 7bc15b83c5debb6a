"""pytest-allreduce's entry point: options, hooks and fixtures; the session object does the work.

Loaded into every pytest run of an environment where the plugin is installed, so nothing
here (or in what `pytest_configure` builds) imports torch: a project that never asks for an
allreduce pays only for parsing options. torch is imported when a rank pool starts.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs
from .options import OPTION_SPECS, add_options, parse_options

if TYPE_CHECKING:
    from .model import Case, Job, Latency
    from .session import AccuracyCall, AllreduceSession, CheckCall, LatencyCall

SESSION_KEY = pytest.StashKey["AllreduceSession"]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    from . import benchmarking, xdist_roles
    from .engine import under_torchrun
    from .plan import (
        Plan,
        PlanError,
        check_capacity,
        check_choices,
        gpu_model_name,
        plan_warnings,
        visible_gpu_ids,
    )
    from .registry import BackendRegistry
    from .session import PLUGIN_NAME, AllreduceSession

    config.addinivalue_line(
        "markers", "allreduce_suite(name): the suite a test belongs to (numerics, graph, ...)"
    )
    options = parse_options(config)
    registry = BackendRegistry()
    registry.load_builtins()
    registry.load_entry_points()
    config.hook.pytest_allreduce_register_backends(registry=registry)
    role = xdist_roles.role(config)
    if role == "worker":
        # Before the plan counts GPUs: this worker sees only its share from here on.
        xdist_roles.adopt_worker_devices(config)
    workers = xdist_roles.worker_count(config) if role == "controller" else 1
    try:
        plan = Plan.build(options, registry)
    except ValueError as exc:
        allowed = ", ".join(["all", *registry.allowed_names()])
        raise pytest.UsageError(f"--allreduce-backends: {exc}; allowed: {allowed}") from None
    asked = allreduce_asked_for(config)
    try:
        check_choices(plan, options.device)
        if asked:
            check_capacity(plan, torchrun=under_torchrun(), workers=workers)
    except PlanError as exc:
        raise pytest.UsageError(str(exc)) from None
    if options.baseline is not None:
        from .config import device_label
        from .options import check_baseline_device

        name = "cpu" if plan.device == "cpu" else gpu_model_name()
        check_baseline_device(options.baseline, plan.device, device_label(name) if name else None)
    session = AllreduceSession(options, plan, registry, config=config, role=role)
    session.report.warnings += plan_warnings(plan, workers=workers)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, PLUGIN_NAME)
    config.pluginmanager.register(benchmarking.carrier(config, session), benchmarking.PLUGIN_NAME)
    if role == "controller":
        shares = (
            xdist_roles.split_devices(visible_gpu_ids(), workers)
            if asked and plan.device == "cuda"
            else None
        )
        controller = xdist_roles.XdistController(session, shares)
        config.pluginmanager.register(controller, xdist_roles.CONTROLLER_PLUGIN_NAME)


def allreduce_asked_for(config: pytest.Config) -> bool:
    """Whether this session was asked to run allreduce work: an allreduce option given (on
    the command line or as an ini key), or the plugin's suites among what pytest collects.

    The plugin is loaded into every pytest run of its environment. Only a session that asked
    for it may fail for this machine's GPU count, or have its xdist workers' GPUs narrowed:
    another project's `pytest -n 8` must see its GPUs as it always did.
    """
    for spec in OPTION_SPECS:
        if config.getoption(spec.dest) is not None or config.getini(spec.ini) not in (None, "", []):
            return True
    suites = _suites_dir()
    return suites is not None and any(
        target == suites or suites in target.parents for target in _collection_targets(config)
    )


def _suites_dir() -> Path | None:
    spec = find_spec("pytest_allreduce.suites")
    locations = spec.submodule_search_locations if spec else None
    return Path(next(iter(locations))).resolve() if locations else None


def _collection_targets(config: pytest.Config) -> list[Path]:
    """The paths pytest collects from (`--pyargs` module names resolved to their files)."""
    targets = []
    for arg in config.args:
        name = arg.split("::")[0]
        if config.getoption("pyargs"):
            try:
                spec = find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.submodule_search_locations:
                targets += [Path(p) for p in spec.submodule_search_locations]
                continue
            if spec is not None and spec.origin:
                targets.append(Path(spec.origin))
                continue
        targets.append(config.invocation_params.dir / name)
    return [t.resolve() for t in targets]


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def allreduce_session(pytestconfig: pytest.Config) -> AllreduceSession:
    """The session object: plan, engine (rank pools), result store."""
    return pytestconfig.stash[SESSION_KEY]


class CheckRunner:
    """A check of the table at one case, ready to run; failures fail the calling test."""

    def __init__(self, session: AllreduceSession, call: CheckCall) -> None:
        self.session = session
        self.call = call

    def run(self) -> None:
        from .engine import CaseSkipped
        from .pool import RankFailure

        try:
            outcome = self.session.engine.run_check(self.call.check, self.call.case)
        except CaseSkipped as skipped:
            pytest.skip(str(skipped))
        except RankFailure as failure:
            report = str(failure)
        else:
            if outcome.passed:
                return
            report = outcome.describe()
        # Outside the except block, so the report is shown once, not once more as the
        # exception "during handling" of which the failure was raised.
        pytest.fail(report, pytrace=False)


def _require(session: AllreduceSession, case: Case) -> None:
    """Skip when the case cannot run here; fail when asking the ranks failed."""
    from .engine import CaseSkipped
    from .pool import RankFailure

    try:
        session.engine.require(case)
        return
    except CaseSkipped as skipped:
        pytest.skip(str(skipped))
    except RankFailure as failure:
        report = str(failure)
    pytest.fail(report, pytrace=False)


@pytest.fixture
def allreduce_check(
    allreduce_session: AllreduceSession, request: pytest.FixtureRequest
) -> CheckRunner:
    """A check of the table at one case (parametrised by the session from the suite's
    marker); skips with the reason when the case cannot run here."""
    runner = CheckRunner(allreduce_session, request.param)
    _require(allreduce_session, runner.call.case)
    return runner


class LatencyRunner:
    """Every runnable candidate at one size, timed together (interleaved rounds); the test
    fails naming each candidate that failed, and each candidate's verdict is its own."""

    def __init__(self, session: AllreduceSession, call: LatencyCall, test_id: str) -> None:
        self.session = session
        self.call = call
        self.test_id = test_id

    def measure(self, job: Job) -> list[Latency]:
        outcome = self.session.measure_together(self.call.cases, job, self.test_id)
        if outcome.failed:
            pytest.fail(
                "\n\n".join(
                    f"{case.target.backend} failed:\n{report}"
                    for case, report in outcome.failed.items()
                ),
                pytrace=False,
            )
        if not outcome.latencies:
            pytest.skip(
                "; ".join(f"{case.target.backend}: {why}" for case, why in outcome.skipped.items())
            )
        return outcome.latencies


@pytest.fixture
def allreduce_latency(
    allreduce_session: AllreduceSession, request: pytest.FixtureRequest
) -> LatencyRunner:
    """Every runnable candidate at one size (parametrised by the session), ready to time."""
    return LatencyRunner(allreduce_session, request.param, request.node.nodeid)


class RankRunner:
    """Runs your own rank functions on the session's persistent process groups.

    `run(world_size, fn, *args)` calls fn(ctx, *args) on every rank of the pool of that size
    (started on first use, reused by every later test) and returns every rank's result in
    rank order; when any rank raises, dies or hangs, the calling test fails with every
    rank's report, and a broken pool is replaced before the next call.
    """

    def __init__(self, session: AllreduceSession) -> None:
        self.session = session

    def run(self, world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        from .pool import RankFailure

        try:
            return self.session.engine.call(world_size, fn, *args)
        except RankFailure as failure:
            report = str(failure)
        pytest.fail(report, pytrace=False)


@pytest.fixture(scope="session")
def allreduce_ranks(allreduce_session: AllreduceSession) -> RankRunner:
    """Run rank functions on torchrun-style process groups: `allreduce_ranks.run(2, fn)`."""
    return RankRunner(allreduce_session)


class AccuracyRunner:
    """One backend (or endpoint) of the accuracy suite: runs GSM8K through it and fails the
    test with the reasons when its answers differ from the reference's beyond the rules."""

    def __init__(self, session: AllreduceSession, call: AccuracyCall) -> None:
        self.session = session
        self.call = call

    def run(self) -> None:
        from .accuracy.runner import AccuracyUnavailable
        from .pool import RankFailure

        call, session = self.call, self.session
        try:
            if call.endpoint:
                verdict = session.accuracy.judge_endpoint(call.name)
            else:
                verdict = session.accuracy.judge(
                    call.name, call.world_size, compared=self.compared()
                )
        except AccuracyUnavailable as exc:
            pytest.skip(str(exc))
        except RankFailure as failure:
            report = str(failure)
            session.store.disqualify(call.name, call.world_size, f"accuracy: {report[:300]}")
        else:
            session.record_accuracy(verdict)
            if verdict.passed:
                return
            report = "\n".join(verdict.problems)
        pytest.fail(report, pytrace=False)

    def compared(self) -> int:
        """How many backends are compared with the reference at this world size (the
        Bonferroni split of McNemar's level)."""
        calls = self.session.accuracy_calls()
        return max(1, sum(1 for c in calls if c.world_size == self.call.world_size) - 1)


@pytest.fixture
def allreduce_accuracy(
    allreduce_session: AllreduceSession, request: pytest.FixtureRequest
) -> AccuracyRunner:
    """A backend (parametrised by the session) of the accuracy suite, available here."""
    from .engine import CaseSkipped
    from .pool import RankFailure

    call: AccuracyCall = request.param
    if not call.endpoint:
        variant = allreduce_session.registry.variant(call.name)
        if variant is None:
            pytest.fail(f"--allreduce-gsm8k-reference={call.name}: no such backend", pytrace=False)
        try:
            availability = allreduce_session.engine.availability(variant, call.world_size)
        except RankFailure as failure:
            pytest.fail(str(failure), pytrace=False)
        except CaseSkipped as skipped:
            pytest.skip(str(skipped))
        if not availability.available:
            pytest.skip(
                f"{call.name} unavailable at world size {call.world_size}: {availability.reason}"
            )
    return AccuracyRunner(allreduce_session, call)


class CaseRunner:
    """One case (a backend variant at one shape), set up; runs rank functions with it and
    measures its latency."""

    def __init__(self, session: AllreduceSession, case: Case) -> None:
        self.session = session
        self.case = case

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(ctx, work, *args) on every rank, `work` naming this case's set-up backend
        (`pytest_allreduce.jobs.backend_for(ctx, work)` gives the instance)."""
        work = self.session.engine.work(self.case.target)
        return RankRunner(self.session).run(self.case.target.world_size, fn, work, *args)

    def measure(self, job: Job) -> list[float]:
        from .pool import RankFailure

        try:
            latency = self.session.engine.measure(self.case, job, self.session.timing_plan)
        except RankFailure as failure:
            report = str(failure)
        else:
            self.session.record_latency(latency)
            return latency.samples_us
        pytest.fail(report, pytrace=False)


@pytest.fixture
def allreduce(allreduce_session: AllreduceSession, allreduce_case: Case) -> CaseRunner:
    """The case under test, set up: skips with the reason when it cannot run here."""
    _require(allreduce_session, allreduce_case)
    return CaseRunner(allreduce_session, allreduce_case)
