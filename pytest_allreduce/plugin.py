"""pytest-allreduce's entry point: options, hooks and fixtures; the session object does the work.

Loaded into every pytest run of an environment where the plugin is installed, so nothing
here (or in what `pytest_configure` builds) imports torch: a project that never asks for an
allreduce pays only for parsing options. torch is imported when a rank pool starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs
from .options import add_options, parse_options

if TYPE_CHECKING:
    from .model import Case, Job, Latency
    from .session import AllreduceSession, CheckCall, LatencyCall

SESSION_KEY = pytest.StashKey["AllreduceSession"]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    from .plan import Plan
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
    try:
        plan = Plan.build(options, registry)
    except ValueError as exc:
        allowed = ", ".join(["all", *registry.allowed_names()])
        raise pytest.UsageError(f"--allreduce-backends: {exc}; allowed: {allowed}") from None
    session = AllreduceSession(options, plan, registry)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, PLUGIN_NAME)


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
