"""The rank side: process-group set-up and the loop a pool rank runs.

A rank initialises its process group once, then runs every function the pool sends it with
its RankContext until told to stop. This module must stay importable without CUDA.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from . import nccl_env
from .context import RankContext

STOP = None  # the message that ends a rank's loop


def init_rank_context(device_type: str, timeout_s: float) -> RankContext:
    """Initialise this process's groups from torchrun's environment variables.

    CUDA: an NCCL group bound to this rank's GPU (device_id makes NCCL create its
    communicator now, not lazily inside a CUDA-graph capture) plus a gloo group for CPU-side
    exchanges. CPU: one gloo group serves both.
    """
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda":
        nccl_env.apply_rank_settings()  # before the first communicator: NCCL reads it once
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        device = torch.device("cpu")
        # Ranks share the host's cores: without this each rank starts one thread per core
        # and they fight over them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
        dist.init_process_group("gloo", timeout=timeout)
        cpu_group = dist.group.WORLD
    return RankContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        group=dist.group.WORLD,
        cpu_group=cpu_group,
        timeout_s=timeout_s,
    )


def close_rank_context(ctx: RankContext) -> None:
    """Close every set-up backend (collective), then the process group."""
    from .jobs import close_backends

    close_backends(ctx)
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_when_orphaned(parent_pid: int) -> None:
    # A rank must not outlive its pytest process, even when stuck in a collective.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(70)


def rank_main(
    rank: int,
    world_size: int,
    master_port: int,
    device_type: str,
    timeout_s: float,
    conn: Connection,
    stack_path: str,
    parent_pid: int,
) -> None:
    """Entry point of one pool rank (started with the spawn method)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
    )
    stack_file = open(stack_path, "w")  # noqa: SIM115 - lives as long as the process
    # The pool sends SIGUSR1 when a call times out: every thread's Python stack goes to the
    # file, even when the main thread is blocked inside a C++ collective.
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()

    try:
        ctx = init_rank_context(device_type, timeout_s)
    except BaseException:
        conn.send(("init_failed", traceback.format_exc()))
        return
    conn.send(("ready", None))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the pool is gone; nothing left to clean up for
        if message is STOP:
            break
        call_id, fn, args = message
        try:
            reply: tuple[Any, ...] = (call_id, True, fn(ctx, *args))
        except BaseException:
            reply = (call_id, False, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:
            conn.send((call_id, False, traceback.format_exc()))

    try:
        close_rank_context(ctx)
    finally:
        sys.stdout.flush()
        conn.send(("stopped", None))
