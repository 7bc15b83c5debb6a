"""Session-end artifacts: the server config, its evidence, reports, plots, benchmark.json.

Written under the output dir:

- ``tp{N}/allreduce_config_hidden={H},device={DEV}.json`` and, on CUDA, the same config as
  ``tp{N}/allreduce_config_hidden={H},tp={N},device={DEV}.json``: the server config under the
  name each generation of SGLang's adaptive allreduce reads (through ``config.write_config``).
  Its name carries no dtype, so it is emitted from the bfloat16 selection when bfloat16 was
  planned, else from the first planned dtype; the evidence records which.
- ``tp{N}/allreduce_evidence_hidden={H},device={DEV}.json``: per dtype every backend's
  medians, raw samples and verdicts per batch size, the availability matrix with skip
  reasons, the machine fingerprint and why each winner won. A config without its evidence
  cannot be audited; with it, anyone can re-check a choice.
- ``tp{N}/allreduce_report_hidden={H},dtype={D},device={DEV}.md``: the human summary.
- ``tp{N}/allreduce_latency_hidden={H},dtype={D},device={DEV}.png``: fused-job latency
  against batch size per backend with its spread, the chosen backend per size as a strip and
  its speed-up over the server without a config (needs matplotlib; skipped with a note
  without it).
- ``benchmark.json``: the latencies as pytest-benchmark's own records, in the document its
  ``--benchmark-json`` writes (so ``pytest-benchmark compare`` and dashboards built for it
  read our runs); written only where pytest-benchmark is installed.

One module per format; every file goes through `atomic.atomic_write`: a reader, or a
server started mid-run, sees the previous file or the new one, never half of one.

A run that did not cover its whole plan for a (world size, hidden), or failed
(`coverage.py`), writes that shape's files with ``.partial`` before the extension, beside
the complete ones, which it leaves as they were.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, config_paths, device_label
from ..coverage import Coverage
from ..model import GroupKey
from ..results import ResultStore
from ..selection import Selection
from .atomic import atomic_write, dumps_json
from .benchmark import (
    BENCHMARK_JSON,
    benchmark_document,
    benchmark_records,
    dumps_benchmark,
    machine_info,
)
from .config import default_config_dtype, write_config
from .evidence import evidence
from .plot import plot_png
from .report import report

if TYPE_CHECKING:
    import pytest


def write_accuracy(store: ResultStore, output_dir: str | os.PathLike[str]) -> list[Path]:
    """The accuracy suite's summary and report per world size, when it ran."""
    from . import accuracy

    by_world_size: dict[int, dict[str, dict]] = defaultdict(dict)
    for (backend, ws), result in sorted(store.accuracy.items()):
        by_world_size[ws][backend] = result
    written = []
    for ws, results in sorted(by_world_size.items()):
        tp_dir = Path(output_dir) / (f"tp{ws}" if ws else "endpoints")
        doc = accuracy.summary(results, store.accuracy_model)
        written.append(atomic_write(tp_dir / accuracy.SUMMARY_NAME, dumps_json(doc)))
        text = accuracy.report(results, store.accuracy_model)
        written.append(atomic_write(tp_dir / accuracy.REPORT_NAME, text))
        written.append(atomic_write(tp_dir / accuracy.SAMPLES_NAME, accuracy.samples(results)))
    return written


class WrittenArtifacts(list[Path]):
    """The paths written (a plain list to callers) plus notes on what was skipped and why."""

    def __init__(self, paths: Iterable[Path] = (), notes: Iterable[str] = ()) -> None:
        super().__init__(paths)
        self.notes: list[str] = list(notes)


def write_artifacts(
    store: ResultStore,
    selections: Mapping[GroupKey, Selection],
    output_dir: str | os.PathLike[str],
    device_name: str,
    config_dtype_for: Callable[[int, int], str] | None = None,
    coverage: Mapping[tuple[int, int], Coverage] | None = None,
    pytest_config: pytest.Config | None = None,
) -> WrittenArtifacts:
    """Write every artifact; return the paths written, with `.notes` on what was skipped.

    `selections` should be in plan order (its first dtype per (world size, hidden) is the
    "first planned dtype"). `config_dtype_for(world_size, hidden)` names the dtype whose
    selection goes into the config; by default `default_config_dtype` over the planned
    dtypes found in `selections`. `device_name` is the raw device name
    (``torch.cuda.get_device_name()`` or ``"cpu"``). `coverage` says per (world size,
    hidden) whether the run was complete; a shape it calls partial (or leaves out) gets
    ``.partial`` files; without `coverage` every shape counts as complete. `pytest_config`,
    where given, lets pytest-benchmark's hooks build benchmark.json (see
    `benchmark.benchmark_document`).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="machine-info") as background:
        # pytest-benchmark's machine info waits on a subprocess for about a second: it runs
        # beside the configs, evidence, reports and plots.
        machine = (
            background.submit(machine_info, pytest_config)
            if find_spec("pytest_benchmark")
            else None
        )
        return _write_artifacts(
            store,
            selections,
            output_dir,
            device_name,
            config_dtype_for,
            coverage,
            pytest_config,
            machine,
        )


def _write_artifacts(
    store: ResultStore,
    selections: Mapping[GroupKey, Selection],
    output_dir: str | os.PathLike[str],
    device_name: str,
    config_dtype_for: Callable[[int, int], str] | None,
    coverage: Mapping[tuple[int, int], Coverage] | None,
    pytest_config: pytest.Config | None,
    machine: Future[dict[str, Any]] | None,
) -> WrittenArtifacts:
    out = Path(output_dir)
    dev = device_label(device_name)
    written = WrittenArtifacts()
    by_shape: dict[tuple[int, int], dict[GroupKey, Selection]] = defaultdict(dict)
    for key, sel in selections.items():
        by_shape[(key.world_size, key.hidden)][key] = sel

    for (ws, hidden), groups in by_shape.items():
        planned = [k.dtype for k in groups]
        config_dtype = (
            config_dtype_for(ws, hidden) if config_dtype_for else default_config_dtype(planned)
        )
        config_note = ""
        if config_dtype not in planned:
            fallback = default_config_dtype(planned)
            config_note = (
                f"config dtype {config_dtype} has no selection here; used {fallback} instead"
            )
            written.notes.append(f"tp{ws} hidden {hidden}: {config_note}")
            config_dtype = fallback
        source = groups[GroupKey(ws, hidden, config_dtype)]
        covered = (
            coverage.get((ws, hidden), Coverage(ws, hidden, ("its coverage was not recorded",)))
            if coverage is not None
            else Coverage(ws, hidden, ())
        )
        partial = "" if covered.complete else ".partial"
        config_files = config_paths(
            out, ws, hidden, device_name, store.device, partial=bool(partial)
        )
        if source.choices:
            try:
                config = source.to_config()
                for path in config_files:
                    written.append(write_config(path, config, store.device))
                config_note = config_note or f"emitted from the {config_dtype} selection"
            except ConfigError as exc:
                config_note = f"config not written: {exc}"
                written.notes.append(f"tp{ws} hidden {hidden}: {config_note}")
                config_files = ()
        else:
            config_note = f"config not written: no batch size has a winner for {config_dtype}"
            written.notes.append(f"tp{ws} hidden {hidden}: {config_note}")
            config_files = ()
        if not covered.complete:
            written.notes.append(
                f"tp{ws} hidden {hidden}: this run is {covered.describe()}; its files carry "
                f"'.partial' and leave any complete config of a full run as it was"
            )

        tp_dir = out / f"tp{ws}"
        evidence_doc = evidence(
            store, ws, hidden, dev, groups, config_dtype, config_files, config_note, covered
        )
        written.append(
            atomic_write(
                tp_dir / f"allreduce_evidence_hidden={hidden},device={dev}{partial}.json",
                dumps_json(evidence_doc),
            )
        )
        for key, sel in groups.items():
            stem = f"hidden={hidden},dtype={key.dtype},device={dev}{partial}"
            text = report(store, key, sel, dev, config_dtype, config_files, covered)
            written.append(atomic_write(tp_dir / f"allreduce_report_{stem}.md", text))
            try:
                png = plot_png(store, key, sel, dev)
            except ImportError as exc:
                written.notes.append(
                    f"plot for {key.label} skipped: matplotlib is not available ({exc})"
                )
                continue
            written.append(atomic_write(tp_dir / f"allreduce_latency_{stem}.png", png))

    try:
        records = benchmark_records(store, selections, device_name)
    except ImportError:
        written.notes.append(
            f"{BENCHMARK_JSON} not written: pytest-benchmark is not installed "
            "(pip install pytest-benchmark)"
        )
    else:
        info = machine.result() if machine is not None else None
        document = benchmark_document(records, store, device_name, pytest_config, info)
        written.append(atomic_write(out / BENCHMARK_JSON, dumps_benchmark(document)))
    return written


def planned_file_count(selections: Mapping[GroupKey, Selection]) -> int:
    """How many files `write_artifacts` writes for `selections`, barring errors (for the
    progress line before it starts): per (world size, hidden) the evidence and, where the
    config's selection has a winner, the config; per group a report and, with matplotlib,
    a plot; and benchmark.json with pytest-benchmark."""
    from ..consumer import profile_for

    shapes: dict[tuple[int, int], list[GroupKey]] = defaultdict(list)
    for key in selections:
        shapes[(key.world_size, key.hidden)].append(key)
    count = 0
    for (ws, hidden), keys in shapes.items():
        config_dtype = default_config_dtype([k.dtype for k in keys])
        chosen = selections[GroupKey(ws, hidden, config_dtype)]
        # One config file per name the consumer's generations read.
        names = len(profile_for(chosen.device).config_files(hidden, ws, "device"))
        count += 1 + names * bool(chosen.choices)
        count += len(keys) * (1 + bool(find_spec("matplotlib")))
    return count + bool(find_spec("pytest_benchmark"))
