"""Local probe helpers shared by the GPU backends: CUDA, capability, packages, topology.

Everything here is local to one rank (no collectives), imports torch and GPU libraries
lazily (backend modules are imported while pytest starts) and returns a short reason string
where the answer is "no", or None where it is "yes".
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_allreduce.context import RankContext

MiB = 1 << 20

ONE_NODE_REASON = "needs every rank on one node"


def cuda_refusal(ctx: RankContext, *, rocm_ok: bool = False) -> str | None:
    """Why this rank has no usable CUDA device for a GPU backend, or None."""
    import torch

    if ctx.device.type != "cuda":
        return f"needs a CUDA device (rank device is {ctx.device.type})"
    if not torch.cuda.is_available():
        return "CUDA not available"
    if not rocm_ok and torch.version.hip is not None:
        return "CUDA only (this is a ROCm build of torch)"
    return None


def capability(ctx: RankContext) -> tuple[int, int]:
    import torch

    major, minor = torch.cuda.get_device_capability(ctx.device)
    return int(major), int(minor)


def capability_text(cap: tuple[int, int]) -> str:
    return f"{cap[0]}.{cap[1]}"


def min_capability_refusal(ctx: RankContext, minimum: tuple[int, int]) -> str | None:
    cap = capability(ctx)
    if cap < minimum:
        return f"compute capability {capability_text(cap)} < {capability_text(minimum)}"
    return None


def major_refusal(ctx: RankContext, majors: tuple[int, ...], what: str) -> str | None:
    """Refuse unless the compute capability's major version is one of `majors`."""
    cap = capability(ctx)
    if cap[0] not in majors:
        allowed = ", ".join(f"{m}.x" for m in majors)
        return f"{what} needs compute capability {allowed}, have {capability_text(cap)}"
    return None


def one_node_refusal(ctx: RankContext) -> str | None:
    if ctx.world_size > ctx.local_world_size:
        return ONE_NODE_REASON
    return None


def multicast_refusal(ctx: RankContext) -> str | None:
    """Multicast backends refuse on their own too (the engine already skips them)."""
    if not ctx.multicast_allowed:
        from pytest_allreduce.context import multicast_disabled_by

        return "NVLink multicast is off here (" + ", ".join(multicast_disabled_by()) + ")"
    return None


@functools.cache
def _import_outcome(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # an ABI mismatch or a missing CUDA library, not only ImportError
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return text[:160]
    return None


def module_refusal(module: str, package: str) -> str | None:
    """Why `module` (from the distribution `package`) cannot be imported here, or None."""
    top = module.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"{package} not installed"
    failure = _import_outcome(module)
    if failure:
        return f"{package} failed to import ({failure})"
    return None


def loaded_library(stem: str) -> str | None:
    """The path of an already loaded shared library whose file name starts with `stem`."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith(stem) and os.path.isfile(path):
                    return path
    except OSError:
        return None
    return None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def package_version(distribution: str) -> str:
    """The installed version (read once per process: a metadata lookup costs milliseconds,
    and `engaged()` names it in every check's report)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


# ---- topology ------------------------------------------------------------------------------


def group_devices(ctx: RankContext) -> list[int] | None:
    """This process's CUDA indices of the GPUs of every rank on this node, or None.

    Assumes the usual one-process-per-GPU layout where local rank i drives visible device i;
    where this process cannot see its peers' GPUs the answer is None (cannot check locally).
    """
    import torch

    if ctx.device.index is None or ctx.device.index != ctx.local_rank:
        return None
    count = torch.cuda.device_count()
    if count < ctx.local_world_size:
        return None
    return list(range(ctx.local_world_size))


def _nvml_handle(nvml: Any, index: int) -> Any:
    import torch

    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        if not text.startswith(("GPU-", "MIG-")):
            text = "GPU-" + text
        return nvml.nvmlDeviceGetHandleByUUID(text)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        domain = getattr(props, "pci_domain_id", 0)
        device = getattr(props, "pci_device_id", 0)
        return nvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{device:02x}.0")
    raise RuntimeError("torch reports neither a UUID nor a PCI bus id for the GPU")


def full_nvlink(ctx: RankContext) -> tuple[bool, str]:
    """(True, "") when every pair of this node's GPUs in the group is NVLink-connected.

    Otherwise (False, why). Uses NVML (nvidia-ml-py's `pynvml`) as servers do.
    """
    devices = group_devices(ctx)
    if devices is None:
        return False, "peer GPUs are not visible to this process"
    if len(devices) < 2:
        return True, ""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return False, "nvidia-ml-py (pynvml) not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return False, f"NVML unavailable ({type(exc).__name__})"
    try:
        handles = [_nvml_handle(pynvml, d) for d in devices]
        for i, first in enumerate(handles):
            for j in range(i + 1, len(handles)):
                status = pynvml.nvmlDeviceGetP2PStatus(
                    first, handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK
                )
                if status != pynvml.NVML_P2P_STATUS_OK:
                    return False, f"GPUs {devices[i]} and {devices[j]} are not NVLink-connected"
    except Exception as exc:
        return False, f"NVLink check failed ({type(exc).__name__}: {exc})"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return True, ""


def full_nvlink_refusal(ctx: RankContext) -> str | None:
    """Custom-allreduce kernels silently do nothing for world size > 2 without full NVLink."""
    if ctx.world_size <= 2:
        return None
    ok, why = full_nvlink(ctx)
    if ok:
        return None
    return f"needs full NVLink for world size {ctx.world_size} ({why})"


def peer_access_refusal(ctx: RankContext) -> str | None:
    """Refuse when the driver says this GPU cannot access a peer's memory directly."""
    import torch

    devices = group_devices(ctx)
    if devices is None:
        return None  # cannot tell locally; set-up fails loudly if IPC really does not work
    own = ctx.device.index
    for peer in devices:
        if peer != own and not torch.cuda.can_device_access_peer(own, peer):
            return f"no P2P access from GPU {own} to GPU {peer}"
    return None


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}
