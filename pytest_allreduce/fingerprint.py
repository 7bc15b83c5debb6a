"""The machine fingerprint: what a latency number or a winner depends on.

A latency baseline or a tuned config is only meaningful on the machine kind that produced it:
the GPU, its driver, CUDA and NCCL, the library versions of the fast backends (a FlashInfer
upgrade alone has made a fused kernel several times slower) and the NVLink topology. The
fingerprint travels in the evidence, the baseline and benchmark.json so a reader can tell
whether two runs are comparable.

`collect` runs inside a rank (it may touch CUDA there). Every field is probed on its own
and a probe that fails records "unavailable: why" instead of raising: a missing nvidia-smi
must never cost the session its results.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from . import nccl_env
from .context import RankContext, multicast_disabled_by

# How long any one external query may take; a wedged driver must not hang the session.
SUBPROCESS_TIMEOUT_S: float = 15.0
# Optional libraries whose version decides kernel behaviour: key -> (distributions, module).
LIBRARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "flashinfer_version": (("flashinfer-python", "flashinfer"), "flashinfer"),
    "sgl_kernel_version": (("sgl-kernel", "sglang-kernel"), "sgl_kernel"),
}
UNAVAILABLE = "unavailable"


def _unavailable(why: str) -> str:
    return f"{UNAVAILABLE}: {why}"


def _probe(fn: Callable[[], Any]) -> Any:
    """fn(), or "unavailable: <exception>" when it raises anything."""
    try:
        return fn()
    except Exception as exc:
        return _unavailable(f"{type(exc).__name__}: {exc}".strip())


def _run(argv: list[str]) -> str:
    """stdout of a command; raises with a readable reason when it cannot run or fails."""
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(f"{argv[0]} not found on PATH")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}" + (f": {detail[-1]}" if detail else "")
        )
    return done.stdout


def _driver_version() -> str:
    """The NVIDIA driver version: pynvml first, nvidia-smi second."""
    reasons = []
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:
        reasons.append(f"pynvml: {type(exc).__name__}: {exc}")
    try:
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        if lines:
            return lines[0]
        reasons.append("nvidia-smi: empty answer")
    except Exception as exc:
        reasons.append(f"nvidia-smi: {exc}")
    return _unavailable("; ".join(reasons))


def _library_version(distributions: tuple[str, ...], module: str) -> str:
    """A library's version from its distribution metadata, else its module's __version__.

    On GPU hosts these libraries are sometimes on PYTHONPATH without dist-info, so the
    module attribute is the fallback; importing is tried only when the metadata is absent.
    """
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        mod = sys.modules.get(module) or importlib.import_module(module)
    except Exception as exc:
        return _unavailable(f"not installed ({type(exc).__name__}: {exc})")
    version = getattr(mod, "__version__", None)
    if version is None:
        return _unavailable(f"{module} has no __version__ and no distribution metadata")
    return str(version)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or _unavailable("no /proc/cpuinfo model name")


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def collect(ctx: RankContext) -> dict[str, Any]:
    """The fingerprint of the machine `ctx`'s rank runs on. Never raises."""
    import torch

    on_cuda = _probe(lambda: ctx.is_cuda) is True
    not_cuda = _unavailable(f"device is {getattr(ctx.device, 'type', ctx.device)}")

    def cuda_only(fn: Callable[[], Any]) -> Any:
        return _probe(fn) if on_cuda else not_cuda

    fp: dict[str, Any] = {
        "device_type": "cuda" if on_cuda else "cpu",
        "device_name": _probe(lambda: torch.cuda.get_device_name(ctx.device)) if on_cuda else "cpu",
        "device_count": _probe(torch.cuda.device_count),
        "world_size": _probe(lambda: ctx.world_size),
        "compute_capability": cuda_only(
            lambda: "{}.{}".format(*torch.cuda.get_device_capability(ctx.device))
        ),
        "driver_version": _driver_version() if on_cuda else not_cuda,
        "cuda_version": _probe(
            lambda: torch.version.cuda or _unavailable("torch was built without CUDA")
        ),
        "nccl_version": _probe(
            lambda: (
                ".".join(map(str, torch.cuda.nccl.version()))
                if torch.cuda.is_available()
                else _unavailable("CUDA is not available")
            )
        ),
        "torch_version": _probe(lambda: torch.__version__),
        "python_version": platform.python_version(),
        "hostname": _probe(socket.gethostname),
        "platform": _probe(platform.platform),
        "cpu_model": _probe(_cpu_model),
        "cpu_count": _probe(os.cpu_count),
        "cpu_count_usable": _probe(_usable_cpus),
        "multicast_disabled_by": _probe(multicast_disabled_by),
        "nccl_environment": _probe(nccl_env.in_effect),
        "topology": cuda_only(lambda: _run(["nvidia-smi", "topo", "-m"]).rstrip()),
    }
    for key, (dists, module) in LIBRARIES.items():
        fp[key] = _probe(lambda d=dists, m=module: _library_version(d, m))
    fp["pytest_allreduce_version"] = _probe(
        lambda: _library_version(("pytest-allreduce",), "pytest_allreduce")
    )
    return fp


def device_name(fingerprint: dict[str, Any]) -> str:
    """The device name a fingerprint records: the GPU's name, "cpu" on the CPU, and
    "unknown device" when the fingerprint has no usable name (never failing)."""
    if fingerprint.get("device_type") == "cpu":
        return "cpu"
    name = fingerprint.get("device_name")
    if not isinstance(name, str) or not name.strip() or name.startswith(UNAVAILABLE):
        return "unknown device"
    return name.strip()
