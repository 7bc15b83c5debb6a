"""RankPool: persistent ranks of one process group, and the in-process group under torchrun.

A pool starts its ranks once (spawn method, torchrun's environment) and runs every function
sent to it on every rank, returning every rank's result. Every wait is bounded: a call that
outlasts its timeout is reported with every live rank's Python stack, a rank that dies is
named with its signal, and in both cases the pool is broken and the session replaces it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol

import torch.multiprocessing as mp

from . import worker

# After one rank fails, how long the others get to finish before they are presumed stuck in
# a collective the failed rank never entered.
FAILURE_GRACE_S = 5.0
STACK_DUMP_WAIT_S = 1.0


class RankFailure(Exception):
    """A distributed call failed; the message is the whole report, rank by rank."""

    def __init__(self, summary: str, sections: dict[int, str], pool_broken: bool) -> None:
        self.summary = summary
        self.sections = sections
        self.pool_broken = pool_broken
        body = "\n".join(
            f"---- rank {r} ----\n{text.rstrip()}" for r, text in sorted(sections.items())
        )
        super().__init__(f"{summary}\n{body}" if body else summary)


class Executor(Protocol):
    """What suites and the session use to run a function on every rank."""

    world_size: int
    broken: bool

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float | None = None
    ) -> list[Any]: ...

    def close(self) -> None: ...


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


@dataclass
class _Rank:
    rank: int
    process: Any  # multiprocessing.Process
    conn: Connection
    stack_path: Path
    stack_offset: int = 0


@dataclass
class RankPool:
    """Persistent ranks for one world size on this host."""

    world_size: int
    device_type: str
    timeout_s: float
    _ranks: list[_Rank] = field(default_factory=list)
    _call_id: int = 0
    broken: bool = False
    _tmpdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> RankPool:
        context = mp.get_context("spawn")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="pytest-allreduce-pool-")
        port = free_port()
        for rank in range(self.world_size):
            parent_conn, child_conn = context.Pipe()
            stack_path = Path(self._tmpdir.name) / f"rank{rank}.stacks"
            stack_path.touch()
            process = context.Process(
                target=worker.rank_main,
                args=(
                    rank,
                    self.world_size,
                    port,
                    self.device_type,
                    self.timeout_s,
                    child_conn,
                    str(stack_path),
                    os.getpid(),
                ),
                name=f"allreduce-rank{rank}",
                daemon=True,
            )
            process.start()
            child_conn.close()
            self._ranks.append(_Rank(rank, process, parent_conn, stack_path))
        try:
            self._collect(expect=None, timeout=self.timeout_s, what="process-group start-up")
        except RankFailure:
            self.close()
            raise
        return self

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        """Run fn(ctx, *args) on every rank; every rank's return value, in rank order."""
        if self.broken:
            raise RuntimeError("this rank pool is broken; the session starts a new one")
        self._call_id += 1
        for r in self._ranks:
            # A dead rank is reported by _collect with its exit status.
            with contextlib.suppress(BrokenPipeError, OSError):
                r.conn.send((self._call_id, fn, args))
        name = getattr(fn, "__qualname__", repr(fn))
        return self._collect(self._call_id, timeout or self.timeout_s, what=name)

    def _collect(self, expect: int | None, timeout: float, what: str) -> list[Any]:
        """Wait for one reply per rank. `expect` None means the start-up handshake."""
        deadline = time.monotonic() + timeout
        grace_deadline: float | None = None
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        dead: dict[int, str] = {}
        pending = {r.rank: r for r in self._ranks}
        while pending:
            limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
            remaining = limit - time.monotonic()
            if remaining <= 0:
                break
            waitables: dict[Any, _Rank] = {}
            for r in pending.values():
                waitables[r.conn] = r
                waitables[r.process.sentinel] = r
            for ready in wait(list(waitables), timeout=remaining):
                r = waitables[ready]
                if r.rank not in pending:
                    continue
                if r.conn.poll():
                    try:
                        message = r.conn.recv()
                    except (EOFError, OSError):
                        message = None
                    if message is not None and self._accept(
                        r.rank, message, expect, results, errors
                    ):
                        del pending[r.rank]
                        continue
                    if message is not None:
                        continue  # a stale reply from an earlier, abandoned call
                    r.process.join(timeout=2)  # end of pipe: the rank is going away
                if not r.process.is_alive():
                    r.process.join(timeout=1)
                    dead[r.rank] = describe_exit(r.process.exitcode)
                    del pending[r.rank]
            if (errors or dead) and grace_deadline is None:
                grace_deadline = time.monotonic() + FAILURE_GRACE_S

        if not (pending or errors or dead):
            return [results[r] for r in range(self.world_size)]

        sections: dict[int, str] = {r: f"raised:\n{tb}" for r, tb in errors.items()}
        for r, how in dead.items():
            sections[r] = f"died: {how}"
        if pending:
            stacks = self._dump_stacks(list(pending))
            for r in pending:
                sections[r] = f"no reply: Python stacks of every thread:\n{stacks.get(r, '')}"
        broken = bool(pending or dead)
        parts = []
        if dead:
            parts.append(
                "; ".join(f"rank {r} {how}" for r, how in sorted(dead.items())) + f" during {what}"
            )
        if errors:
            parts.append(f"{what} raised on rank(s) {sorted(errors)}")
        if pending:
            waited = timeout if grace_deadline is None else FAILURE_GRACE_S
            parts.append(
                f"rank(s) {sorted(pending)} gave no reply to {what} within {waited:.0f} s"
                + (" after the failure above" if grace_deadline is not None else "")
            )
        if broken:
            parts.append("the rank pool was killed and will be replaced")
            self.close(force=True)
        raise RankFailure("; ".join(parts), sections, pool_broken=broken)

    def _accept(
        self,
        rank: int,
        message: tuple[Any, ...],
        expect: int | None,
        results: dict[int, Any],
        errors: dict[int, str],
    ) -> bool:
        if expect is None:
            kind, payload = message
            if kind == "ready":
                results[rank] = None
            else:
                errors[rank] = payload
            return True
        call_id, ok, payload = message
        if call_id != expect:
            return False
        if ok:
            results[rank] = payload
        else:
            errors[rank] = payload
        return True

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        alive = [r for r in self._ranks if r.rank in ranks and r.process.is_alive()]
        for r in alive:
            r.stack_offset = r.stack_path.stat().st_size
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.process.pid, signal.SIGUSR1)
        time.sleep(STACK_DUMP_WAIT_S)
        stacks = {}
        for r in self._ranks:
            if r.rank in ranks:
                with open(r.stack_path, errors="replace") as f:
                    f.seek(r.stack_offset)
                    stacks[r.rank] = f.read() or "(no stack dump: the rank did not answer SIGUSR1)"
        return stacks

    def close(self, force: bool = False) -> None:
        """Stop every rank: politely (teardown, bounded) unless forced, then by signal."""
        if not force and not self.broken:
            for r in self._ranks:
                with contextlib.suppress(BrokenPipeError, OSError):
                    r.conn.send(worker.STOP)
            deadline = time.monotonic() + min(self.timeout_s, 30.0)
            for r in self._ranks:
                r.process.join(timeout=max(0.0, deadline - time.monotonic()))
        self.broken = True
        for r in self._ranks:
            if r.process.is_alive():
                r.process.kill()
        for r in self._ranks:
            r.process.join(timeout=5)
            r.conn.close()
        self._ranks.clear()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


class InProcessGroup:
    """The executor under torchrun: this pytest process is one rank of an existing job.

    Every rank runs the same tests; each call runs here and every rank's outcome is
    exchanged, so all ranks pass or fail a test together. A call that outlasts the timeout
    prints every thread's stack and ends this process (torchrun then stops the others):
    there is no parent process here that could replace a stuck rank.
    """

    def __init__(self, device_type: str, timeout_s: float) -> None:
        self.device_type = device_type
        self.timeout_s = timeout_s
        self.ctx = worker.init_rank_context(device_type, timeout_s)
        self.world_size = self.ctx.world_size
        self.broken = False

    @property
    def rank(self) -> int:
        return self.ctx.rank

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        import faulthandler
        import traceback

        faulthandler.dump_traceback_later(timeout or self.timeout_s, exit=True)
        try:
            outcome: tuple[bool, Any] = (True, fn(self.ctx, *args))
        except BaseException:
            outcome = (False, traceback.format_exc())
        finally:
            faulthandler.cancel_dump_traceback_later()
        outcomes = self.ctx.all_gather_object(outcome)
        errors = {r: payload for r, (ok, payload) in enumerate(outcomes) if not ok}
        if errors:
            name = getattr(fn, "__qualname__", repr(fn))
            sections = {r: f"raised:\n{tb}" for r, tb in errors.items()}
            raise RankFailure(f"{name} raised on rank(s) {sorted(errors)}", sections, False)
        return [payload for _, payload in outcomes]

    def close(self) -> None:
        worker.close_rank_context(self.ctx)
