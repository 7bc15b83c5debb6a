"""pytest-xdist: which role this pytest process plays, and the controller's share of the work.

Under `pytest -n N` the controller collects and runs nothing; N workers run the tests, each
with its own rank pools. So that pools of different workers never share a GPU, the
controller splits its visible GPUs into N disjoint shares and hands one to each worker as it
starts (`pytest_configure_node`); the worker exports it as CUDA_VISIBLE_DEVICES before its
plan counts GPUs, and every rank it spawns inherits it. A share is taken back when its worker
goes down, so a worker xdist restarts after a crash gets a free share, whatever its new id.

Each worker sends everything it recorded to the controller through xdist's `workeroutput`
(`results_transfer`), after closing its pools; the controller merges the stores as they
arrive (`pytest_testnodedown`) and does the session-end work once, from all results:
selection with bisection (in its own pools, started only then, when no worker holds a GPU),
artifacts, the gate, the terminal summary and pytest-benchmark's records.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import pytest

from .results_transfer import dump_results, merge_results

if TYPE_CHECKING:
    from .session import AllreduceSession

Role = Literal["single", "controller", "worker"]
# Keys of this plugin in xdist's workerinput (controller -> worker) and workeroutput (back).
DEVICES_KEY = "pytest_allreduce_devices"
RESULTS_KEY = "pytest_allreduce_results"
CONTROLLER_PLUGIN_NAME = "allreduce-xdist-controller"


def role(config: pytest.Config) -> Role:
    """What this process does under pytest-xdist (xdist's own tests for the same states)."""
    if hasattr(config, "workerinput"):
        return "worker"
    distributing = config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None))
    # xdist itself stays out of --collect-only runs, which then collect in this process.
    if distributing and not config.getoption("collectonly"):
        return "controller"
    return "single"


def worker_count(config: pytest.Config) -> int:
    """How many workers the controller starts (`-n N`, or one per `--tx` spec)."""
    from xdist.workermanage import parse_tx_spec_config

    return len(parse_tx_spec_config(config))


def split_devices(devices: list[str], workers: int) -> list[list[str]]:
    """`workers` disjoint, equal, contiguous shares of `devices` (leftovers stay unused, so
    every worker's pools have the same GPU count and run the same world sizes)."""
    size = len(devices) // workers if workers > 0 else 0
    return [devices[i * size : (i + 1) * size] for i in range(workers)]


def adopt_worker_devices(config: pytest.Config) -> None:
    """In a worker: narrow this process (and the ranks it spawns) to its share of the GPUs."""
    devices = getattr(config, "workerinput", {}).get(DEVICES_KEY)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices


def export_results(config: pytest.Config, session: AllreduceSession) -> None:
    """In a worker at session end: close the pools (their GPUs are free before the controller
    may start its own) and hand the results to xdist for the controller."""
    session.engine.close()
    config.workeroutput[RESULTS_KEY] = dump_results(session.store)  # type: ignore[attr-defined]


class XdistController:
    """The controller's part: hands out GPU shares and merges the workers' results."""

    def __init__(self, session: AllreduceSession, shares: list[list[str]] | None) -> None:
        self.session = session
        # None on the CPU: no devices to share (ranks share the cores, see plan_warnings).
        self.free: list[list[str]] | None = shares
        self.held: dict[str, list[str]] = {}

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        if self.free is None:
            return
        if not self.free:
            # Only reachable if xdist started more workers than it announced.
            raise RuntimeError(f"no free GPU share left for xdist worker {_node_id(node)}")
        share = self.free.pop(0)
        self.held[_node_id(node)] = share
        node.workerinput[DEVICES_KEY] = ",".join(share)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        name = _node_id(node)
        share = self.held.pop(name, None)
        if share is not None and self.free is not None:
            self.free.append(share)
        results = getattr(node, "workeroutput", {}).get(RESULTS_KEY)
        if results is not None:
            merge_results(self.session.store, results, f"xdist worker {name}")
        else:
            # A crashed worker sends nothing: what it measured is missing from the configs.
            self.session.report.notes.append(
                f"xdist worker {name} went down without its results ({error or 'no output'}); "
                "the sizes it measured are missing from this session's selection"
            )


def _node_id(node: Any) -> str:
    return str(node.workerinput["workerid"])
