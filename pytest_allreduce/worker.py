"""The rank side: process-group set-up and the loop a pool rank runs.

A rank initialises its process group once, then runs every function the pool sends it with
its RankContext until told to stop. This module must stay importable without CUDA and must
not initialise it: the pool's fork server imports it once and forks every rank from there.
"""

from __future__ import annotations

import faulthandler
import os
import re
import select
import shutil
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from . import nccl_env
from .context import RankContext

STOP = None  # the message that ends a rank's loop
# Pool ranks share one host: gloo's and NCCL's sockets bind to loopback only, so nothing
# outside the host can reach them (their rendezvous is a file, see rank_main).
LOOPBACK_INTERFACE = "lo"
# The text of errors that gloo, NCCL and the CUDA runtime raise as plain RuntimeErrors.
# After one of them the group's state is unknown: a late message of the failed call could
# be taken as the next call's data, and a CUDA error poisons the rank's context for good.
_COLLECTIVE_ERROR_TEXT = re.compile(
    r"gloo|nccl|ProcessGroup|CUDA error|Connection (closed|reset) by peer", re.IGNORECASE
)


@dataclass(frozen=True)
class RankSpec:
    """What a pool rank is told when it starts."""

    rank: int
    world_size: int
    device_type: str
    # How long waits for peers inside the rank (gloo, NCCL, a backend's own spin) may last:
    # longer than every bound of the pool, so that the pool, which can report every rank's
    # stack and replace the group, always decides first.
    wait_timeout_s: float
    pool_dir: str  # private (0700): the rendezvous file and the stack dumps
    environ: dict[str, str]  # the pytest process's environment when the pool started


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there when freed.
_KEPT_BLOCK_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of returning it to the kernel (CPU ranks, where
    the tensors live in host memory).

    By default glibc serves blocks above its mmap threshold (128 KiB at first, adapting up
    to 32 MiB) from fresh mappings and unmaps them when freed, so such a tensor costs a page
    fault per 4 KiB page every time it is made. A server in steady state reuses its memory
    (and CPU deployments often preload tcmalloc or jemalloc for this reason). Here the
    faults were most of the cost of the engine's composed add + RMSNorm on the 2-core
    development machine, a VM (14 ms against 5 ms at 512 rows x 4096). False where the C
    library has no mallopt (not glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _KEPT_BLOCK_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, 2 * _KEPT_BLOCK_BYTES)
    )


def init_rank_context(
    device_type: str, wait_timeout_s: float, store: dist.Store | None = None
) -> RankContext:
    """Initialise this process's groups; RANK and WORLD_SIZE come from the environment.

    `store` is the rendezvous (None: torchrun's, from MASTER_ADDR and MASTER_PORT).
    CUDA: an NCCL group bound to this rank's GPU (device_id makes NCCL create its
    communicator now, not lazily inside a CUDA-graph capture) plus a gloo group for CPU-side
    exchanges. CPU: one gloo group serves both.
    """
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    timeout = timedelta(seconds=wait_timeout_s)
    rendezvous: dict[str, Any] = (
        {} if store is None else {"store": store, "rank": rank, "world_size": world_size}
    )
    if device_type == "cuda":
        nccl_env.apply_rank_settings()  # before the first communicator: NCCL reads it once
        # Deterministic cuBLAS (read when its first handle is made): the accuracy suite
        # compares two backends' generations token for token, which the same GEMMs must
        # not perturb run to run. A value the user set is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device, **rendezvous)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        device = torch.device("cpu")
        # Ranks share the host's cores: without this each rank starts one thread per core
        # and they fight over them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
        keep_freed_memory()
        dist.init_process_group("gloo", timeout=timeout, **rendezvous)
        cpu_group = dist.group.WORLD
    return RankContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        group=dist.group.WORLD,
        cpu_group=cpu_group,
        timeout_s=wait_timeout_s,
    )


def close_rank_context(ctx: RankContext) -> None:
    """Close every set-up backend (collective), then the process group."""
    from .jobs import close_backends

    close_backends(ctx)
    if dist.is_initialized():
        dist.destroy_process_group()


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) says the process group may be unusable."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (dist.DistError, torch.AcceleratorError, TimeoutError)):
            return True
        if isinstance(current, RuntimeError) and _COLLECTIVE_ERROR_TEXT.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _abandon(pool_dir: str) -> NoReturn:
    """The pytest process is gone: remove the pool's temp dir, which it could not, and exit
    (every rank that notices does so; the sweep at the next start covers a rank that could
    not, such as one aborted by its collective library)."""
    shutil.rmtree(pool_dir, ignore_errors=True)
    os._exit(70)


def _exit_when_orphaned(lifeline: int, pool_dir: str) -> None:
    # A rank must not outlive its pytest process, even when stuck in a collective. The pool
    # holds the other end of the rank's pipe; the kernel reports a hang-up once the pytest
    # process is gone (polling with no events asks for exactly that).
    poller = select.poll()
    poller.register(lifeline, 0)
    poller.poll()
    _abandon(pool_dir)


def rank_main(spec: RankSpec, conn: Connection) -> None:
    """Entry point of one pool rank (forked by the fork server, or spawned)."""
    # The fork server's environment is the one pytest had when the server started;
    # the pool's may differ since (tests set variables), so it is replaced as a whole.
    os.environ.clear()
    os.environ.update(spec.environ)
    os.environ.update(
        RANK=str(spec.rank),
        LOCAL_RANK=str(spec.rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_WORLD_SIZE=str(spec.world_size),
        GROUP_RANK="0",
        GLOO_SOCKET_IFNAME=LOOPBACK_INTERFACE,
        NCCL_SOCKET_IFNAME=LOOPBACK_INTERFACE,
    )
    stack_file = open(Path(spec.pool_dir, f"rank{spec.rank}.stacks"), "w")  # noqa: SIM115
    # The pool sends SIGUSR1 when a call times out: every thread's Python stack goes to the
    # file, even when the main thread is blocked inside a C++ collective.
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    threading.Thread(
        target=_exit_when_orphaned, args=(conn.fileno(), spec.pool_dir), daemon=True
    ).start()

    try:
        # A file in the pool's private dir, not a TCP store: a TCP store listens on every
        # interface, a file is reachable only by this user on this host.
        store = dist.FileStore(str(Path(spec.pool_dir, "rendezvous")), spec.world_size)
        ctx = init_rank_context(spec.device_type, spec.wait_timeout_s, store)
    except BaseException:
        conn.send(("init_failed", traceback.format_exc()))
        return
    conn.send(("ready", None))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            _abandon(spec.pool_dir)
        if message is STOP:
            break
        call_id, fn, args = message
        try:
            reply: tuple[Any, ...] = (call_id, "ok", fn(ctx, *args))
        except BaseException as error:
            outcome = "group_failed" if is_collective_failure(error) else "raised"
            reply = (call_id, outcome, traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:
            _abandon(spec.pool_dir)
        except Exception:  # the result could not be pickled
            conn.send((call_id, "raised", traceback.format_exc()))

    try:
        close_rank_context(ctx)
    finally:
        sys.stdout.flush()
        conn.send(("stopped", None))
