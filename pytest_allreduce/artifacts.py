"""Session-end artifacts: the server config, its evidence, reports, plots, benchmark.json.

Written under the output dir:

- ``tp{N}/allreduce_config_hidden={H},device={DEV}.json``: the server config (through
  ``config.write_config``). Its name carries no dtype, so it is emitted from the bfloat16
  selection when bfloat16 was planned, else from the first planned dtype; the evidence
  records which.
- ``tp{N}/allreduce_evidence_hidden={H},device={DEV}.json``: per dtype every backend's
  medians, raw samples and verdicts per batch size, the availability matrix with skip
  reasons, the machine fingerprint and why each winner won. A config without its evidence
  cannot be audited; with it, anyone can re-check a choice.
- ``tp{N}/allreduce_report_hidden={H},dtype={D},device={DEV}.md``: the human summary.
- ``tp{N}/allreduce_latency_hidden={H},dtype={D},device={DEV}.png``: fused-job latency
  against batch size per backend, the chosen backend ringed (needs matplotlib; skipped
  with a note without it).
- ``benchmark.json``: the latencies in the structure pytest-benchmark's ``--benchmark-json``
  writes, so ``pytest-benchmark compare`` and dashboards built for it can read our runs.

Every file goes through `atomic_write` (temporary file in the same directory, then
``os.replace``): a reader, or a server started mid-run, sees the previous file or the new one,
never half of one, and a second run replaces the first run's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, config_path, write_config
from .model import GroupKey, Latency, Target
from .results import ResultStore
from .selection import (
    MIN_GAIN,
    P_VALUE_MAX,
    SELECTION_JOB,
    Selection,
    standard_type,
)

EVIDENCE_FORMAT = "pytest-allreduce-evidence"
EVIDENCE_VERSION = 1
# The dtype whose selection names the config when it was planned (servers run bf16).
PREFERRED_CONFIG_DTYPE = "bfloat16"
CONFIG_DTYPE_RULE = (
    "the config file name carries no dtype, so the config is emitted from the "
    f"{PREFERRED_CONFIG_DTYPE} selection when {PREFERRED_CONFIG_DTYPE} was planned, "
    "else from the first planned dtype"
)
# pytest-benchmark's file format version we follow when it is not installed to ask.
BENCHMARK_FORMAT_FALLBACK_VERSION = "5.2.3"
BENCHMARK_JSON = "benchmark.json"
_GIT_TIMEOUT_S = 10.0


class WrittenArtifacts(list[Path]):
    """The paths written (a plain list to callers) plus notes on what was skipped and why."""

    def __init__(self, paths: Iterable[Path] = (), notes: Iterable[str] = ()) -> None:
        super().__init__(paths)
        self.notes: list[str] = list(notes)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` to `path` so readers see the old file or the new one, never a part.

    The temporary file lives in the target's directory so ``os.replace`` is a rename
    within one file system (atomic on POSIX); on any failure it is removed and the old file
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


def dumps_json(obj: Any) -> str:
    """JSON text for artifacts: indented, and never failing on an odd value (str() it)."""
    return json.dumps(obj, indent=2, default=str) + "\n"


def default_config_dtype(dtypes: Sequence[str]) -> str:
    """The dtype whose selection is written to the config (see CONFIG_DTYPE_RULE)."""
    if not dtypes:
        raise ValueError("no dtype was planned")
    return PREFERRED_CONFIG_DTYPE if PREFERRED_CONFIG_DTYPE in dtypes else dtypes[0]


def dev_label(device_name: str) -> str:
    """DEV in file names: the device name with spaces as underscores (as the server does)."""
    return device_name.strip().replace(" ", "_")


# ---- indexing the store ----------------------------------------------------------------------


@dataclasses.dataclass
class _GroupData:
    """What the store holds for one GroupKey, indexed for the writers."""

    key: GroupKey
    targets: list[Target]
    sizes: list[int]
    latencies: dict[tuple[str, int, str], Latency]  # (backend, batch size, job) -> latency

    def latency(self, backend: str, batch_size: int, job: str) -> Latency | None:
        return self.latencies.get((backend, batch_size, job))


def _group_data(store: ResultStore, key: GroupKey) -> _GroupData:
    latencies = {
        (case.target.backend, case.batch_size, job): lat
        for (case, job), lat in store.latencies.items()
        if case.target.group_key == key
    }
    targets = [t for t in store.targets() if t.group_key == key]
    return _GroupData(key, targets, store.checked_batch_sizes(key), latencies)


def _suites(store: ResultStore) -> list[str]:
    """Suites to show: the gating ones first (in their order), then the others by name."""
    required = list(store.required_suites())
    others = sorted(store.suites_run - set(required))
    return required + others


def _latency_json(lat: Latency) -> dict[str, Any]:
    return {
        "median_us": lat.median_us,
        "p10_us": lat.spread_us[0],
        "p90_us": lat.spread_us[1],
        "algbw_gbps": lat.algbw_gbps,
        "busbw_gbps": lat.busbw_gbps,
        "samples_us": [float(s) for s in lat.samples_us],
        "ops_per_sample": lat.ops_per_sample,
        "clock": lat.clock,
        "message_bytes": lat.message_bytes,
        "engaged": lat.engaged,
    }


def _availability_rows(store: ResultStore, world_size: int, ran: Iterable[str]) -> list[dict]:
    """One row per backend known at `world_size`: ran, available-but-not-run or skipped."""
    ran = set(ran)
    rows: dict[str, dict[str, Any]] = {}
    for (name, ws), avail in store.availability.items():
        if ws != world_size:
            continue
        status = "skipped"
        if avail.available:
            status = "ran" if name in ran else "available, not run"
        rows[name] = {
            "backend": name,
            "backend_type": store.backend_types.get(name),
            "available": avail.available,
            "status": status,
            "reason": avail.reason,
            "limits": avail.limits,
        }
    for name in ran - set(rows):
        rows[name] = {
            "backend": name,
            "backend_type": store.backend_types.get(name),
            "available": True,
            "status": "ran",
            "reason": "",
            "limits": {},
        }
    return [rows[n] for n in sorted(rows)]


# ---- evidence --------------------------------------------------------------------------------


def _dtype_evidence(store: ResultStore, data: _GroupData, selection: Selection | None) -> dict:
    suites = _suites(store)
    backends: dict[str, Any] = {}
    for target in data.targets:
        per_size: dict[str, Any] = {}
        for bs in data.sizes:
            case = target.at(bs)
            checks = store.verdicts.get(case, {})
            lats = {
                job: _latency_json(lat)
                for job in ("allreduce", "fused")
                if (lat := data.latency(target.backend, bs, job)) is not None
            }
            if not checks and not lats:
                continue
            per_size[str(bs)] = {
                "eligible": store.eligible(case),
                "verdicts": {
                    suite: {
                        "outcome": store.suite_outcome(case, suite),
                        "checks": [dataclasses.asdict(v) for v in checks.get(suite, [])],
                    }
                    for suite in suites
                    if suite in checks or suite in store.required_suites()
                },
                "latency": lats,
            }
        backends[target.backend] = {
            "backend_type": store.backend_types.get(target.backend),
            "fused_kernel": target.backend in store.fused_backends,
            "simplicity": store.simplicity.get(target.backend),
            "batch_sizes": per_size,
        }
    return {
        "selection": selection.to_json() if selection is not None else None,
        "backends": backends,
    }


def _evidence(
    store: ResultStore,
    world_size: int,
    hidden: int,
    dev: str,
    groups: dict[GroupKey, Selection],
    config_dtype: str,
    config_file: Path | None,
    config_note: str,
) -> dict[str, Any]:
    ran = {t.backend for key in groups for t in _group_data(store, key).targets}
    return {
        "format": EVIDENCE_FORMAT,
        "format_version": EVIDENCE_VERSION,
        "generated": datetime.now(timezone.utc).isoformat(),
        "world_size": world_size,
        "hidden": hidden,
        "device": store.device,
        "device_name": dev,
        "config": {
            "file": config_file.name if config_file is not None else None,
            "dtype": config_dtype,
            "dtype_rule": CONFIG_DTYPE_RULE,
            "note": config_note,
        },
        "selection_rule": {
            "job": SELECTION_JOB,
            "standard_type": standard_type(store.device),
            "test": "one-sided Mann-Whitney U, challenger samples less than reference samples",
            "p_value_max": P_VALUE_MAX,
            "min_gain": MIN_GAIN,
        },
        "required_suites": list(store.required_suites()),
        "missing_suites": store.missing_suites(),
        "machine": store.machine,
        "availability": _availability_rows(store, world_size, ran),
        "dtypes": {
            key.dtype: _dtype_evidence(store, _group_data(store, key), sel)
            for key, sel in groups.items()
        },
    }


# ---- Markdown report -------------------------------------------------------------------------


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _machine_line(machine: Mapping[str, Any]) -> str:
    fields = [
        ("GPU", "device_name"),
        ("driver", "driver_version"),
        ("CUDA", "cuda_version"),
        ("NCCL", "nccl_version"),
        ("torch", "torch_version"),
        ("FlashInfer", "flashinfer_version"),
        ("sgl-kernel", "sgl_kernel_version"),
        ("host", "hostname"),
    ]
    parts = [f"{label} {machine[k]}" for label, k in fields if machine.get(k) is not None]
    return "; ".join(parts) if parts else "no machine fingerprint recorded"


def _report(
    store: ResultStore,
    key: GroupKey,
    selection: Selection,
    dev: str,
    config_dtype: str,
    config_file: Path | None,
) -> str:
    data = _group_data(store, key)
    suites = _suites(store)
    std = standard_type(store.device)
    lines = [
        f"# Allreduce report: tp{key.world_size}, hidden {key.hidden}, {key.dtype}, {dev}",
        "",
        f"- Device: {store.device}; {_machine_line(store.machine)}",
        f"- Job compared: `{SELECTION_JOB}` (allreduce + residual add + RMSNorm); "
        f"standard path: `{std}`",
        f"- Rule: a challenger replaces the default only with one-sided Mann-Whitney "
        f"p < {P_VALUE_MAX} and a median at least {MIN_GAIN:.0%} lower; ties go to the "
        "simpler backend",
    ]
    if config_file is not None and key.dtype == config_dtype:
        lines.append(f"- Config: `{config_file.name}` is emitted from this selection")
    elif config_file is not None:
        lines.append(
            f"- Config: `{config_file.name}` is emitted from the {config_dtype} selection, "
            f"not this one ({CONFIG_DTYPE_RULE})"
        )
    else:
        lines.append("- Config: none written (no batch size has a winner)")
    if store.missing_suites():
        lines.append(f"- Gating suites that did not run: {', '.join(store.missing_suites())}")

    ran = {t.backend for t in data.targets}
    lines += [
        "",
        "## Backends",
        "",
        "| backend | config type | fused kernel | status | reason |",
        "|---|---|---|---|---|",
    ]
    for row in _availability_rows(store, key.world_size, ran):
        fused = "yes" if row["backend"] in store.fused_backends else "no"
        lines.append(
            f"| {row['backend']} | {row['backend_type'] or '-'} | {fused} | {row['status']} "
            f"| {_md_cell(row['reason'] or '')} |"
        )

    lines += [
        "",
        "## Chosen backend per batch size",
        "",
        "| batch size | chosen | config type | fusion flag | fused median (us) | why |",
        "|---|---|---|---|---|---|",
    ]
    for bs in selection.batch_sizes:
        choice = selection.choices.get(bs)
        if choice is None:
            why = _md_cell(selection.no_winner.get(bs, ""))
            lines.append(f"| {bs} | none | - | - | - | {why} |")
            continue
        lines.append(
            f"| {bs} | **{choice.backend_name}** | {choice.backend_type} | "
            f"{str(choice.use_residual_rmsnorm_fusion).lower()} | {_fmt_us(choice.median_us)} "
            f"| {_md_cell(choice.reason)} |"
        )

    lines += ["", "## Per batch size", ""]
    suite_heads = " | ".join(suites)
    for bs in data.sizes:
        std_medians = [
            lat.median_us
            for t in data.targets
            if store.backend_types.get(t.backend) == std
            and (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        ]
        std_best = min(std_medians) if std_medians else None
        lines += [
            f"### Batch size {bs}",
            "",
            f"| backend | fused median (us) | allreduce median (us) | allreduce p10-p90 (us) "
            f"| algbw / busbw (GB/s) | speedup vs fastest {std} | {suite_heads} | chosen |",
            "|---|---|---|---|---|---|" + "---|" * len(suites) + "---|",
        ]
        for t in data.targets:
            fused_lat = data.latency(t.backend, bs, SELECTION_JOB)
            bare_lat = data.latency(t.backend, bs, "allreduce")
            case = t.at(bs)
            if fused_lat is None and bare_lat is None and case not in store.verdicts:
                continue
            fused_med = fused_lat.median_us if fused_lat is not None else None
            speedup = (
                f"{std_best / fused_med:.2f}x"
                if std_best is not None and fused_med is not None and fused_med > 0
                else "-"
            )
            outcomes = " | ".join(store.suite_outcome(case, s) for s in suites)
            chosen = selection.winner(bs) == t.backend
            name = f"**{t.backend}**" if chosen else t.backend
            spread = bandwidth = "-"
            if bare_lat is not None:
                low, high = bare_lat.spread_us
                spread = f"{low:.2f}-{high:.2f}"
                bandwidth = f"{bare_lat.algbw_gbps:.1f} / {bare_lat.busbw_gbps:.1f}"
            lines.append(
                f"| {name} | {_fmt_us(fused_med)} | "
                f"{_fmt_us(bare_lat.median_us if bare_lat else None)} | {spread} | {bandwidth} | "
                f"{speedup} | {outcomes} | {'chosen' if chosen else ''} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---- plot ------------------------------------------------------------------------------------


def _plot_png(store: ResultStore, key: GroupKey, selection: Selection, dev: str) -> bytes:
    """The latency plot as PNG bytes. Raises ImportError when matplotlib is missing.

    Uses matplotlib's object API with the Agg canvas directly, so the user's pyplot backend
    and global state are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    data = _group_data(store, key)
    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for t in data.targets:
        points = [
            (bs, lat.median_us)
            for bs in data.sizes
            if (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=t.backend)
    ineligible = [
        (bs, lat.median_us)
        for t in data.targets
        for bs in data.sizes
        if (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        and not store.eligible(t.at(bs))
    ]
    if ineligible:
        ax.scatter(
            [p[0] for p in ineligible],
            [p[1] for p in ineligible],
            marker="x",
            s=40,
            color="red",
            zorder=4,
            label="not eligible (failed or unchecked suite)",
        )
    chosen = [(bs, c.median_us, c.backend_name) for bs, c in sorted(selection.choices.items())]
    if chosen:
        ax.scatter(
            [c[0] for c in chosen],
            [c[1] for c in chosen],
            s=90,
            facecolors="none",
            edgecolors="black",
            linewidths=1.3,
            zorder=5,
            label="chosen",
        )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel(f"{SELECTION_JOB} job median latency (us)")
    ax.set_title(f"tp{key.world_size}, hidden {key.hidden}, {key.dtype}, {dev}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    description = "chosen: " + ", ".join(f"{bs}={name}" for bs, _, name in chosen)
    fig.savefig(
        buffer,
        format="png",
        dpi=110,
        metadata={"Title": ax.get_title(), "Description": description},
    )
    return buffer.getvalue()


# ---- pytest-benchmark JSON -------------------------------------------------------------------


def _stats_seconds(samples_us: Sequence[float], iterations: int) -> dict[str, Any]:
    """pytest-benchmark's stats block for our samples, in seconds (computed with numpy)."""
    data = np.asarray(samples_us, dtype=float) * 1e-6
    n = int(data.size)
    mean = float(np.mean(data))
    stddev = float(np.std(data, ddof=1)) if n > 1 else 0.0
    q1, q3 = (float(q) for q in np.percentile(data, [25, 75]))
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    inside = data[(data >= low) & (data <= high)]
    iqr_outliers = int(n - inside.size)
    stddev_outliers = int(np.count_nonzero((data < mean - stddev) | (data > mean + stddev)))
    total = float(np.sum(data))
    return {
        "min": float(np.min(data)),
        "max": float(np.max(data)),
        "mean": mean,
        "stddev": stddev,
        "rounds": n,
        "median": float(np.median(data)),
        "iqr": iqr,
        "q1": q1,
        "q3": q3,
        "iqr_outliers": iqr_outliers,
        "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": float(inside.min()) if inside.size else float(np.min(data)),
        "hd15iqr": float(inside.max()) if inside.size else float(np.max(data)),
        "ops": n / total if total > 0 else 0.0,
        "total": total,
        "data": [float(x) for x in data],
        "iterations": iterations,
    }


def _git(args: list[str]) -> str:
    done = subprocess.run(
        ["git", *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=True
    )
    return done.stdout.strip()


def _commit_info() -> dict[str, Any]:
    """The commit of the working directory, best effort (a tuning run need not be in git)."""
    info: dict[str, Any] = {
        "id": "unknown",
        "time": None,
        "author_time": None,
        "dirty": False,
        "project": Path.cwd().name,
        "branch": "(unknown)",
    }
    try:
        info["id"] = _git(["rev-parse", "HEAD"])
        info["time"] = _git(["show", "-s", "--pretty=format:%cI"]) or None
        info["author_time"] = _git(["show", "-s", "--pretty=format:%aI"]) or None
        info["dirty"] = bool(_git(["status", "--porcelain", "--untracked-files=no"]))
        branch = _git(["rev-parse", "--abbrev-ref", "HEAD"])
        info["branch"] = "(detached head)" if branch == "HEAD" else branch
        info["project"] = Path(_git(["rev-parse", "--show-toplevel"])).name
    except (OSError, subprocess.SubprocessError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _machine_info(store: ResultStore, device_name: str) -> dict[str, Any]:
    """pytest-benchmark's machine_info keys, plus the GPU identity it lacks."""
    m = store.machine

    def get(name: str) -> Any:
        return m.get(name, "unknown")

    return {
        "node": m.get("hostname", platform.node()),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python_compiler": platform.python_compiler(),
        "python_implementation": platform.python_implementation(),
        "python_implementation_version": platform.python_version(),
        "python_version": m.get("python_version", platform.python_version()),
        "python_build": list(platform.python_build()),
        "release": platform.release(),
        "system": platform.system(),
        "cpu": {
            "brand_raw": m.get("cpu_model", platform.processor()),
            "count": m.get("cpu_count", os.cpu_count()),
            "arch_string_raw": platform.machine(),
        },
        "device_type": store.device,
        "gpu": device_name,
        "gpu_count": get("device_count"),
        "compute_capability": get("compute_capability"),
        "driver_version": get("driver_version"),
        "cuda_version": get("cuda_version"),
        "nccl_version": get("nccl_version"),
        "torch_version": get("torch_version"),
        "flashinfer_version": get("flashinfer_version"),
        "sgl_kernel_version": get("sgl_kernel_version"),
        "pytest_allreduce_version": get("pytest_allreduce_version"),
        "topology": get("topology"),
    }


def benchmark_json(
    store: ResultStore, selections: Mapping[GroupKey, Selection], device_name: str
) -> dict[str, Any]:
    """Every latency of the session as a pytest-benchmark JSON document.

    One benchmark per (case, job); `group` holds one shape and job, so ``pytest-benchmark
    compare`` lines up the backends competing at that shape. `iterations` is the number of
    back-to-back ops each sample averages over, as in pytest-benchmark.
    """
    try:
        import pytest_benchmark

        version = pytest_benchmark.__version__
    except ImportError:
        version = BENCHMARK_FORMAT_FALLBACK_VERSION
    dev = dev_label(device_name)
    benchmarks = []
    for (case, job), lat in sorted(store.latencies.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if not lat.samples_us:
            continue
        t = case.target
        selection = selections.get(t.group_key)
        chosen = (
            job == SELECTION_JOB
            and selection is not None
            and selection.winner(case.batch_size) == t.backend
        )
        label = f"{job}[{case.label}]"
        benchmarks.append(
            {
                "group": f"{job} tp{t.world_size} hidden={t.hidden} {t.dtype} "
                f"bs={case.batch_size} {dev}",
                "name": label,
                "fullname": f"pytest_allreduce::latency::{label}",
                "params": {
                    "backend": t.backend,
                    "world_size": t.world_size,
                    "hidden": t.hidden,
                    "dtype": t.dtype,
                    "batch_size": case.batch_size,
                    "job": job,
                },
                "param": case.label,
                "extra_info": {
                    "device": dev,
                    "backend_type": store.backend_types.get(t.backend),
                    "message_bytes": lat.message_bytes,
                    "clock": lat.clock,
                    "engaged": lat.engaged,
                    "ops_per_sample": lat.ops_per_sample,
                    "eligible": store.eligible(case),
                    "chosen": chosen,
                },
                "options": {
                    "disable_gc": False,
                    "timer": lat.clock,
                    "min_rounds": len(lat.samples_us),
                    "max_time": None,
                    "min_time": None,
                    "warmup": True,
                },
                "stats": _stats_seconds(lat.samples_us, lat.ops_per_sample),
            }
        )
    return {
        "machine_info": _machine_info(store, device_name),
        "commit_info": _commit_info(),
        "benchmarks": benchmarks,
        "datetime": datetime.now(timezone.utc).isoformat(),
        "version": version,
    }


# ---- entry point -----------------------------------------------------------------------------


def write_artifacts(
    store: ResultStore,
    selections: Mapping[GroupKey, Selection],
    output_dir: str | os.PathLike[str],
    device_name: str,
    config_dtype_for: Callable[[int, int], str] | None = None,
) -> WrittenArtifacts:
    """Write every artifact; return the paths written, with `.notes` on what was skipped.

    `selections` should be in plan order (its first dtype per (world size, hidden) is the
    "first planned dtype"). `config_dtype_for(world_size, hidden)` names the dtype whose
    selection goes into the config; by default `default_config_dtype` over the planned
    dtypes found in `selections`. `device_name` is the raw device name
    (``torch.cuda.get_device_name()`` or ``"cpu"``).
    """
    out = Path(output_dir)
    dev = dev_label(device_name)
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
        config_file: Path | None = config_path(out, ws, hidden, device_name)
        if source.choices:
            try:
                write_config(config_file, source.to_config(), store.device)
                written.append(config_file)
                config_note = config_note or f"emitted from the {config_dtype} selection"
            except ConfigError as exc:
                config_note = f"config not written: {exc}"
                written.notes.append(f"tp{ws} hidden {hidden}: {config_note}")
                config_file = None
        else:
            config_note = f"config not written: no batch size has a winner for {config_dtype}"
            written.notes.append(f"tp{ws} hidden {hidden}: {config_note}")
            config_file = None

        tp_dir = out / f"tp{ws}"
        evidence = _evidence(store, ws, hidden, dev, groups, config_dtype, config_file, config_note)
        written.append(
            atomic_write(
                tp_dir / f"allreduce_evidence_hidden={hidden},device={dev}.json",
                dumps_json(evidence),
            )
        )
        for key, sel in groups.items():
            stem = f"hidden={hidden},dtype={key.dtype},device={dev}"
            report = _report(store, key, sel, dev, config_dtype, config_file)
            written.append(atomic_write(tp_dir / f"allreduce_report_{stem}.md", report))
            try:
                png = _plot_png(store, key, sel, dev)
            except ImportError as exc:
                written.notes.append(
                    f"plot for {key.label} skipped: matplotlib is not available ({exc})"
                )
                continue
            written.append(atomic_write(tp_dir / f"allreduce_latency_{stem}.png", png))

    written.append(
        atomic_write(
            out / BENCHMARK_JSON, dumps_json(benchmark_json(store, selections, device_name))
        )
    )
    return written


__all__ = [
    "BENCHMARK_JSON",
    "CONFIG_DTYPE_RULE",
    "WrittenArtifacts",
    "atomic_write",
    "benchmark_json",
    "default_config_dtype",
    "dev_label",
    "write_artifacts",
]
