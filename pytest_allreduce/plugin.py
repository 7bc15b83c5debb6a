"""pytest-allreduce's pytest hooks, options and fixtures. The work happens in session.py."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import pytest

from . import hookspecs
from .model import Case, Target, Verdict
from .options import add_options, parse_options
from .plan import Plan
from .registry import BackendRegistry
from .session import AllreduceSession

SESSION_KEY = pytest.StashKey[AllreduceSession]()
# Suites run in this order within a world size: correctness before timing.
SUITE_ORDER = {"numerics": 0, "graph": 1, "latency": 2}


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allreduce_suite(name): the suite a test belongs to (numerics, graph, latency)"
    )
    config.addinivalue_line(
        "markers",
        "allreduce_extra_batch_sizes(*rows): batch sizes this test checks besides the plan's",
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
    config.stash[SESSION_KEY] = AllreduceSession(options, plan, registry)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close_pools()


def _session(config: pytest.Config) -> AllreduceSession:
    return config.stash[SESSION_KEY]


# ---- parametrisation -------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    wanted = {"allreduce_case", "allreduce_target"} & set(metafunc.fixturenames)
    if not wanted:
        return
    session = _session(metafunc.config)
    # Targets that cannot run here for reasons known without asking a rank (another
    # device, multicast off, world size) get no test items at all, rather than thousands
    # of skips; the backend matrix in the summary lists each with its reason.
    runnable = [t for t in session.plan.targets() if session.engine_availability(t).available]
    if "allreduce_case" in metafunc.fixturenames:
        extra = [
            int(rows)
            for mark in metafunc.definition.iter_markers("allreduce_extra_batch_sizes")
            for rows in mark.args
        ]
        session.extra_rows.update(extra)
        sizes = sorted({*session.plan.batch_sizes, *extra})
        cases = [t.at(bs) for t in runnable for bs in sizes]
        metafunc.parametrize("allreduce_case", cases, ids=[c.label for c in cases])
    elif "allreduce_target" in metafunc.fixturenames:
        metafunc.parametrize("allreduce_target", runnable, ids=[t.label for t in runnable])


def _item_target(item: pytest.Item) -> Target | None:
    params = getattr(item, "callspec", None)
    if params is None:
        return None
    value = params.params.get("allreduce_case") or params.params.get("allreduce_target")
    return value.target if isinstance(value, Case) else value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Group by world size so each pool starts once, and check before timing.
    def key(item: pytest.Item) -> tuple[int, int]:
        target = _item_target(item)
        mark = item.get_closest_marker("allreduce_suite")
        suite = SUITE_ORDER.get(mark.args[0], 9) if mark else 9
        return (target.world_size if target else 0, suite)

    items.sort(key=key)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def allreduce_session(pytestconfig: pytest.Config) -> AllreduceSession:
    """The session object: plan, rank pools, result store."""
    return _session(pytestconfig)


class CaseRunner:
    """Runs rank functions for one case on its world size's pool."""

    def __init__(self, session: AllreduceSession, case: Case) -> None:
        self.session = session
        self.case = case
        self.work = session.require(case)

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        return self.session.run(self.case.target.world_size, fn, self.work, *args)


@pytest.fixture
def allreduce(allreduce_session: AllreduceSession, allreduce_case: Case) -> CaseRunner:
    """The case under test, set up: skips with the reason when it cannot run here."""
    return CaseRunner(allreduce_session, allreduce_case)


# ---- verdicts and the summary ----------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    mark = item.get_closest_marker("allreduce_suite")
    params = getattr(item, "callspec", None)
    case = params.params.get("allreduce_case") if params else None
    decisive = report.when == "call" or (report.when == "setup" and not report.passed)
    if mark and isinstance(case, Case) and decisive:
        detail = report.longreprtext[-2000:] if report.failed else ""
        if report.skipped and isinstance(report.longrepr, tuple):
            detail = str(report.longrepr[2])
        verdict = Verdict(mark.args[0], report.outcome, detail, item.nodeid)  # type: ignore[arg-type]
        _session(item.config).record_verdict(case, verdict)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    allreduce = session.config.stash.get(SESSION_KEY, None)
    if allreduce is None:
        return
    try:
        report = allreduce.finish()
    except Exception as exc:  # artifacts failing must fail the run, loudly
        allreduce.report.errors.append(f"{type(exc).__name__}: {exc}")
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
        raise
    if report.gate_failures and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    allreduce = config.stash.get(SESSION_KEY, None)
    if allreduce is None or not allreduce.store.availability:
        return
    from .summary import summary_lines

    terminalreporter.section("allreduce")
    for line in summary_lines(allreduce):
        terminalreporter.write_line(line)
