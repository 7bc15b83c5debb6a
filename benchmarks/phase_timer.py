"""Where a session's time goes: a pytest plugin printing one line of phase times at the end.

    PYTHONPATH=benchmarks python -m pytest --pyargs pytest_allreduce.suites -p phase_timer

Prints "PHASES ..." with the seconds since start of: collection done, first test, last test,
session-end work (selection, bisection, artifacts) and the pools' shutdown, then the wall time
spent in each test file and its number of tests, and the slowest test of each file.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Generator

import pytest

_START = time.monotonic()
_marks: dict[str, float] = {}
_per_file: defaultdict[str, float] = defaultdict(float)
_counts: Counter[str] = Counter()
_slowest: dict[str, tuple[float, str]] = {}


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
