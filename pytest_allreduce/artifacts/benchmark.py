"""The session's latencies as pytest-benchmark's own records, and benchmark.json from them.

Each latency (a backend variant at one size, one job) becomes a `pytest_benchmark.stats.
Metadata`, the object pytest-benchmark's `benchmark` fixture records: its samples are the
per-op times (each the maximum over ranks), `iterations` the ops each sample timed. So every
statistic (quartiles, IQR, outliers, ops) is pytest-benchmark's own, in its terminal table,
its `--benchmark-json`, its saved runs and `pytest-benchmark compare` alike. The records are
built from the store at session end, bisection sizes included, and are independent of how
the latency suite is laid out in tests.

`benchmark.json` in the output dir is the same document `--benchmark-json` writes, produced
by pytest-benchmark's hooks when its plugin is active (else by its plain functions), with
this plugin's machine fingerprint under its own top-level key. Without pytest-benchmark
installed it is not written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import device_label
from ..model import GroupKey
from ..results import ResultStore
from ..selection import SELECTION_JOB, Selection

if TYPE_CHECKING:
    import pytest

BENCHMARK_JSON = "benchmark.json"
# Our key in pytest-benchmark's JSON documents: the GPU, driver, CUDA, NCCL, library versions
# and topology, which its machine_info does not know. (Kept out of machine_info: that is
# compared when runs are loaded, before any rank has fingerprinted the GPUs.)
FINGERPRINT_KEY = "pytest_allreduce"


@dataclass
class RecordSource:
    """What `Metadata` copies from the fixture it is given: a benchmark's identity."""

    name: str
    fullname: str
    group: str
    param: str
    params: dict[str, Any]
    extra_info: dict[str, Any]
    cprofile_stats: None = None
    has_error: bool = False  # pytest-benchmark leaves records with an error out of its JSON


def benchmark_records(
    store: ResultStore, selections: Mapping[GroupKey, Selection], device_name: str
) -> list[Any]:
    """One `pytest_benchmark.stats.Metadata` per (backend variant, batch size, job) timed.

    Raises ImportError without pytest-benchmark.
    """
    from pytest_benchmark.stats import Metadata

    dev = device_label(device_name)
    records = []
    for (case, job), lat in sorted(store.latencies.items()):
        if not lat.samples_us:
            continue
        t = case.target
        selection = selections.get(t.group_key)
        label = f"{job}[{case.label}]"
        source = RecordSource(
            name=label,
            # Stable across runs: pytest-benchmark matches saved runs by fullname.
            fullname=f"pytest_allreduce::latency::{label}",
            group=f"{job} tp{t.world_size} hidden={t.hidden} {t.dtype} bs={case.batch_size} {dev}",
            param=case.label,
            params={
                "backend": t.backend,
                "world_size": t.world_size,
                "hidden": t.hidden,
                "dtype": t.dtype,
                "batch_size": case.batch_size,
                "job": job,
            },
            extra_info={
                "device": dev,
                "backend_type": store.server_type(t.backend),
                "message_bytes": lat.message_bytes,
                "engaged": lat.engaged,
                "sample": "per-op time of one timed run of `iterations` ops, max over ranks",
                "eligible": store.eligible(case),
                "chosen": job == SELECTION_JOB
                and selection is not None
                and selection.winner(case.batch_size) == t.backend,
            },
        )
        options = {"timer": lat.clock, "ops_per_sample": lat.ops_per_sample}
        record = Metadata(source, iterations=lat.ops_per_sample, options=options)
        # Every sample goes in before any statistic is read: Stats caches what it computes.
        for sample_us in lat.samples_us:
            record.stats.update(sample_us * 1e-6)
        records.append(record)
    return records


def fingerprint_block(store: ResultStore, device_name: str) -> dict[str, Any]:
    return {"device": store.device, "device_name": device_name, "fingerprint": store.machine}


def machine_info(config: pytest.Config | None = None) -> dict[str, Any]:
    """pytest-benchmark's machine info: through its hooks when its plugin is active in
    `config` (so conftest and plugins that adjust it adjust this too), else its plain
    function. Its CPU details come from py-cpuinfo, which runs a Python subprocess (about a
    second): `write_artifacts` asks for it first, in a thread, and writes the other files
    meanwhile."""
    from pytest_benchmark import plugin as pb

    session = config.pluginmanager.get_plugin("pytest-benchmark") if config else None
    if config is not None and session is not None:
        return session.get_machine_info()
    return pb.pytest_benchmark_generate_machine_info()


def benchmark_document(
    records: list[Any],
    store: ResultStore,
    device_name: str,
    config: pytest.Config | None = None,
    machine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """pytest-benchmark's JSON document for `records`, with every sample included.

    With its plugin active in `config`, through its hooks (so conftest and plugins that
    adjust machine or commit info adjust this file too, and our hook adds the fingerprint);
    else through the functions its plugin implements those hooks with. `machine` is
    `machine_info(config)` where the caller already has it.
    """
    from pytest_benchmark import plugin as pb
    from pytest_benchmark.utils import get_commit_info

    if machine is None:
        machine = machine_info(config)
    session = config.pluginmanager.get_plugin("pytest-benchmark") if config else None
    if config is not None and session is not None:
        hook = config.hook
        commit_info = hook.pytest_benchmark_generate_commit_info(config=config)
        hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
        document = hook.pytest_benchmark_generate_json(
            config=config,
            benchmarks=records,
            include_data=True,
            machine_info=machine,
            commit_info=commit_info,
        )
        hook.pytest_benchmark_update_json(config=config, benchmarks=records, output_json=document)
    else:
        project = config.getoption("benchmark_project_name", None) if config else None
        document = pb.pytest_benchmark_generate_json(
            config=config,
            benchmarks=records,
            include_data=True,
            machine_info=machine,
            commit_info=get_commit_info(project),
        )
    document.setdefault(FINGERPRINT_KEY, fingerprint_block(store, device_name))
    return document


def dumps_benchmark(document: Mapping[str, Any]) -> str:
    """The document as pytest-benchmark writes its own JSON files."""
    from pytest_benchmark.utils import safe_dumps

    return safe_dumps(document, ensure_ascii=True, indent=4)
