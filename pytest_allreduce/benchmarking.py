"""pytest-benchmark: the latency suite is the benchmark.

pytest-benchmark counts a test as a benchmark when it requests its `benchmark` fixture; that
is what `--benchmark-only` runs and `--benchmark-skip` skips. The latency suite requests
`allreduce_benchmark`, which stands for `benchmark` when pytest-benchmark is active and for
nothing when it is not (so the suite runs either way). The fixture is never called: the
plugin times every candidate itself, on every rank, and at session end hands pytest-benchmark
one record per measured latency (`artifacts.benchmark.benchmark_records`), so its table,
`--benchmark-json`, `--benchmark-autosave`/`--benchmark-save`, `--benchmark-compare` and
histograms see them as their own.

Under pytest-xdist, pytest-benchmark switches itself off in every process; the workers'
latencies still reach the controller, which hands them over there: its saving and table
work on what it is given, so `--benchmark-json` and autosave still get every record once.
(`--benchmark-only -n N` stays a usage error: pytest-benchmark refuses it itself.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .session import AllreduceSession

PLUGIN_NAME = "allreduce-benchmark"
BENCHMARK_MODULE = "pytest_benchmark.plugin"
# The latency tests request pytest-benchmark's fixture without calling it, on purpose.
UNUSED_FIXTURE_FILTER = (
    "ignore:Benchmark fixture was not used:pytest_benchmark.logger.PytestBenchmarkWarning"
)
CARRIER_FIXTURE = "allreduce_benchmark"


def benchmark_active(config: pytest.Config) -> bool:
    """pytest-benchmark's plugin is loaded here (installed, and not `-p no:benchmark`)."""
    return any(
        getattr(plugin, "__name__", None) == BENCHMARK_MODULE
        for plugin in config.pluginmanager.get_plugins()
    )


class WithBenchmark:
    """Registered when pytest-benchmark is active."""

    def __init__(self, session: AllreduceSession) -> None:
        self.session = session

    @pytest.fixture
    def allreduce_benchmark(self, benchmark: Any) -> Any:
        """pytest-benchmark's fixture, so that the latency tests are its benchmarks."""
        return benchmark

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        mark = pytest.mark.filterwarnings(UNUSED_FIXTURE_FILTER)
        for item in items:
            if CARRIER_FIXTURE in getattr(item, "fixturenames", ()):
                item.add_marker(mark)

    @pytest.hookimpl(optionalhook=True)
    def pytest_benchmark_update_json(
        self, config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]
    ) -> None:
        from .artifacts.benchmark import FINGERPRINT_KEY, fingerprint_block

        if self.session.store.latencies:
            output_json[FINGERPRINT_KEY] = fingerprint_block(
                self.session.store, self.session.device_name()
            )


class WithoutBenchmark:
    """Registered when pytest-benchmark is not active: the latency suite runs all the same."""

    @pytest.fixture
    def allreduce_benchmark(self) -> None:
        """Nothing: pytest-benchmark is not active in this session."""
        return None


def carrier(config: pytest.Config, session: AllreduceSession) -> WithBenchmark | WithoutBenchmark:
    return WithBenchmark(session) if benchmark_active(config) else WithoutBenchmark()


def publish(config: pytest.Config, records: list[Any]) -> bool:
    """Hand `records` to pytest-benchmark's session; False where there is none to take them
    (not installed, `-p no:benchmark`, or `--benchmark-disable` asked for no statistics)."""
    session = config.pluginmanager.get_plugin("pytest-benchmark")
    if session is None:
        return False
    if config.getoption("benchmark_disable", False) and not config.getoption(
        "benchmark_enable", False
    ):
        return False
    session.benchmarks.extend(records)
    return True
