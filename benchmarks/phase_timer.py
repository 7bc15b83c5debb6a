"""Where a session's time goes: a pytest plugin printing one line of phase times at the end.

    PYTHONPATH=benchmarks python -m pytest --pyargs pytest_allreduce.suites -p phase_timer

Prints "PHASES ..." with the seconds since start of: collection done, first test, last test,
session-end work (selection, bisection, artifacts) and the pools' shutdown, then the wall time
spent in each test file and its number of tests, and the slowest test of each file. Then one
"ENGINE" line per kind of engine work (a check by its label, a timing by its job), split by
where it ran (a suite's tests, bisection, routed sizes): seconds, calls, seconds per call,
slowest first. (Session-end work runs inside pytest_sessionfinish, after the last test.)
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Generator
from typing import Any

import pytest

from pytest_allreduce.engine import Engine

_START = time.monotonic()
_marks: dict[str, float] = {}
_per_file: defaultdict[str, float] = defaultdict(float)
_counts: Counter[str] = Counter()
_slowest: dict[str, tuple[float, str]] = {}


_engine_work: defaultdict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])


def _account(method: str, what: Callable[[tuple[Any, ...]], str]) -> None:
    """Wrap Engine.<method> to add each call's seconds under (what, where it ran): the
    engine's current test id names a suite's test or a session-end step."""
    original = getattr(Engine, method)

    def accounted(self: Engine, *args: Any, **kwargs: Any) -> Any:
        began = time.monotonic()
        try:
            return original(self, *args, **kwargs)
        finally:
            current = self.current_test or ""
            where = current.split("::")[0].rsplit("/", 1)[-1] or "-"
            entry = _engine_work[(what(args), where)]
            entry[0] += 1
            entry[1] += time.monotonic() - began

    setattr(Engine, method, accounted)


_account("run_check", lambda args: f"check {args[0].label}")
_account("measure_interleaved", lambda args: f"timing {args[1]}")


def _now() -> float:
    return time.monotonic() - _START


def pytest_collection_finish(session: pytest.Session) -> None:
    _marks["collected"] = _now()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator:
    _marks.setdefault("first_test", _now())
    began = time.monotonic()
    result = yield
    took = time.monotonic() - began
    name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
    _per_file[name] += took
    _counts[name] += 1
    if took > _slowest.get(name, (0.0, ""))[0]:
        _slowest[name] = (took, item.nodeid.split("::")[-1])
    _marks["last_test"] = _now()
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Generator:
    _marks["session_end_start"] = _now()
    result = yield
    _marks["session_end_done"] = _now()
    return result


def pytest_unconfigure(config: pytest.Config) -> None:
    _marks["pools_closed"] = _now()
    parts = [f"{k} {v:.1f}s" for k, v in _marks.items()]
    parts += [
        f"{f}: {_per_file[f]:.1f}s / {_counts[f]} tests (slowest {_slowest[f][0]:.2f}s "
        f"{_slowest[f][1]})"
        for f in _per_file
    ]
    print("\nPHASES " + " | ".join(parts))
    for (what, where), (calls, seconds) in sorted(_engine_work.items(), key=lambda kv: -kv[1][1]):
        per_call = seconds / calls * 1e3
        figures = f"{seconds:7.2f} s {int(calls):5d} calls {per_call:7.1f} ms/call"
        print(f"ENGINE {figures} {what} [{where}]")
