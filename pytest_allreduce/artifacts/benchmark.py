"""benchmark.json: the latencies in the structure pytest-benchmark's --benchmark-json writes,
so `pytest-benchmark compare` and dashboards built for it can read these runs."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import device_label
from ..model import GroupKey
from ..results import ResultStore
from ..selection import SELECTION_JOB, Selection

# pytest-benchmark's file format version we follow when it is not installed to ask.
BENCHMARK_FORMAT_FALLBACK_VERSION = "5.2.3"
BENCHMARK_JSON = "benchmark.json"
_GIT_TIMEOUT_S = 10.0


def _stats_seconds(samples_us: Sequence[float], iterations: int) -> dict[str, Any]:
    """pytest-benchmark's stats block for our samples, in seconds (computed with numpy)."""
    import numpy as np

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
    dev = device_label(device_name)
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
                    "backend_type": store.server_type(t.backend),
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
