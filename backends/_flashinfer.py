"""What the FlashInfer allreduce backends share: probes, workspace life cycle, one-/two-shot.

Workspaces come from FlashInfer's unified API, `create_allreduce_fusion_workspace`, and calls
go through `allreduce_fusion`; the workspace's type picks the kernel family (TRT-LLM or
MNNVL). Creating a TRT-LLM workspace loads FlashInfer's `trtllm_comm` module (JIT-built on
first use; the devkit ships it compiled for SM90); nothing here builds any other module.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

# TRT-LLM kernels: the C++ dispatch handles these world sizes; JIT targets majors 9/10/12.
TRTLLM_WORLD_SIZES: tuple[int, ...] = (2, 4, 8, 16)
TRTLLM_MAJORS: tuple[int, ...] = (9, 10, 12)
MNNVL_MAJORS: tuple[int, ...] = (9, 10)
MNNVL_WORLD_SIZES: tuple[int, ...] = tuple(range(2, 65))
# SGLang's flashinfer_fusion type serves at most this many rows.
SERVER_MAX_ROWS = 2048
# FlashInfer's Lamport limit: a one-shot call needing more than this many bytes
# (rows * hidden * itemsize * world size) silently runs two-shot instead.
MAX_LAMPORT_BYTES = 2_145_386_496
# One-shot while rows * hidden * itemsize * world size <= this many MiB. The 2/4/8 entries are
# FlashInfer's own heuristic (its table has no 16: it raises KeyError there, which is why
# every call here passes use_oneshot explicitly); 16 reuses the 8-rank threshold.
ONESHOT_MAX_MIB: dict[int, int] = {2: 512, 4: 64, 8: 42, 16: 42}
HIDDEN_MULTIPLE = 8  # 16 bytes per thread access with 2-byte dtypes


def comm() -> Any:
    import flashinfer.comm  # type: ignore[import-not-found]

    return flashinfer.comm


def probe_flashinfer(ctx: RankContext, majors: tuple[int, ...], what: str) -> str | None:
    """CUDA, capability major, and an importable flashinfer.comm with the unified API."""
    if reason := _gpu.cuda_refusal(ctx):
        return reason
    if reason := _gpu.major_refusal(ctx, majors, what):
        return reason
    if reason := _gpu.module_refusal("flashinfer.comm", "flashinfer"):
        return reason
    fi = comm()
    for fn in ("create_allreduce_fusion_workspace", "allreduce_fusion", "AllReduceFusionPattern"):
        if not hasattr(fi, fn):
            return f"flashinfer {_gpu.package_version('flashinfer-python')} lacks {fn}"
    return None


def trtllm_use_oneshot(rows: int, hidden: int, itemsize: int, world_size: int) -> bool:
    """The one-/two-shot choice for a TRT-LLM call, made the same way on every rank.

    Two-shot needs rows > world size, and one-shot beyond the Lamport limit would silently
    turn into two-shot, so both bounds override the size threshold.
    """
    if rows <= world_size:
        return True
    comm_bytes = rows * hidden * itemsize * world_size
    if comm_bytes > MAX_LAMPORT_BYTES:
        return False
    threshold = ONESHOT_MAX_MIB.get(world_size, min(ONESHOT_MAX_MIB.values()))
    return comm_bytes <= threshold * _gpu.MiB


def create_workspace(
    ctx: RankContext, backend: str, max_rows: int, hidden: int, dtype: torch.dtype
) -> Any:
    """Collective over ctx.group: a workspace for up to `max_rows` x `hidden` inputs."""
    import torch

    if backend not in ("trtllm", "mnnvl", "auto"):
        raise ValueError(f"unknown FlashInfer allreduce backend {backend!r}")
    if backend != "trtllm" and not ctx.multicast_allowed:
        # mnnvl (and auto, which picks mnnvl where it can) creates NVLink multicast objects.
        raise RuntimeError(f"FlashInfer backend {backend!r} needs multicast, which is off")
    fi = comm()
    kwargs: dict[str, Any] = {
        "backend": backend,
        "world_size": ctx.world_size,
        "rank": ctx.rank,
        "max_token_num": max_rows,
        "hidden_dim": hidden,
        "dtype": dtype,
        "group": ctx.group,
    }
    if backend != "trtllm":
        # The MNNVL workspace ignores `group`; without a comm backend it would use MPI.
        from flashinfer.comm.comm_backend import TorchDistBackend  # type: ignore[import-not-found]

        kwargs["comm_backend"] = TorchDistBackend(ctx.group)
        kwargs["gpus_per_node"] = ctx.local_world_size
    quiet_deprecations()
    with torch.cuda.device(ctx.device):
        workspace = fi.create_allreduce_fusion_workspace(**kwargs)
    return workspace


def destroy_workspace(ctx: RankContext, workspace: Any) -> None:
    """destroy() only drops references; the caller (Backend.close) has synchronised and
    waited for every peer, and the second barrier keeps a peer from freeing what this rank's
    destroy still reaches."""
    workspace.destroy()
    ctx.barrier()


def workspace_kind(workspace: Any) -> str:
    return str(getattr(workspace, "backend", type(workspace).__name__))


def quiet_deprecations() -> None:
    """The unified API calls FlashInfer's own @deprecated legacy functions on every use."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"flashinfer(\.|$)")
    warnings.filterwarnings(
        "ignore", message=r".*unified API allreduce\.py.*", category=DeprecationWarning
    )
