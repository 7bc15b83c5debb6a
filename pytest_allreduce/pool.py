"""RankPool: persistent ranks of one process group, and the in-process group under torchrun.

A pool starts its ranks once and runs every function sent to it on every rank, returning
every rank's result. The pool alone decides that a call failed: every wait inside a rank
(the groups' own timeout, a backend's spin) is given longer than the pool's bounds, so a
stuck call is always reported by the pool, with every live rank's Python stack. A pool that
saw a rank die, a call outlast its bound, or a collective report an error is killed and
never used again; the session starts a new one. Start-up has its own, longer bound.

Ranks are forked from multiprocessing's fork server, which imports torch once for the whole
session: replacing a pool costs a fork and a rendezvous per rank, not a torch import. The
rendezvous is a file in the pool's private (0700) temp dir and gloo and NCCL bind to
loopback, so nothing outside this host can reach a pool.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.util
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, NoReturn, Protocol

from . import leftovers
from .options import DEFAULT_STARTUP_TIMEOUT_S

# After one rank fails, how long the others get to finish (at most the call's bound) before
# they are presumed stuck in a collective the failed rank never entered.
FAILURE_GRACE_S = 5.0
# How long a signalled rank gets to write its stacks (faulthandler writes them from the
# signal handler, in milliseconds unless the host is overloaded).
STACK_DUMP_WAIT_S = 1.0
# How much longer than the pool's bounds a rank's own waits last: enough for the pool to
# collect the stacks and kill the ranks even when the host is loaded.
RANK_WAIT_MARGIN_S = 30.0
_SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its NUL)


class RankFailure(Exception):
    """A distributed call failed; the message is the whole report, rank by rank.

    `summary` is its first line; `pool_broken` says whether the ranks were killed (a hang,
    a death, a collective error), which the engine uses to skip what is left of that case.
    """

    def __init__(self, summary: str, sections: dict[int, str], pool_broken: bool = False) -> None:
        self.summary = summary
        self.pool_broken = pool_broken
        body = "\n".join(
            f"---- rank {r} ----\n{text.rstrip()}" for r, text in sorted(sections.items())
        )
        super().__init__(f"{summary}\n{body}" if body else summary)


class Executor(Protocol):
    """What suites and the session use to run a function on every rank."""

    world_size: int
    broken: bool

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]: ...

    def close(self) -> None: ...


def rank_wait_timeout(timeout_s: float, startup_timeout_s: float) -> float:
    """The bound of waits inside ranks: after every bound of the pool (see the module doc)."""
    return max(timeout_s, startup_timeout_s) + RANK_WAIT_MARGIN_S


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _rank_starter() -> BaseContext:
    """The multiprocessing context ranks start from: the fork server, torch preloaded.

    The fork server listens on a Unix socket in multiprocessing's temp dir, and a socket's
    path holds at most 107 bytes: under a temp dir too long for that, ranks are spawned
    (each imports torch itself, so a pool starts in seconds rather than a fraction of one).
    """
    # multiprocessing removes its temp dir at a normal exit; a killed pytest leaves it, so
    # it is marked as ours for the next session's sweep.
    leftovers.mark_multiprocessing_temp_dir()
    temp_dir = multiprocessing.util.get_temp_dir()
    if len(os.fsencode(temp_dir)) + len("/listener-12345678") > _SOCKET_PATH_MAX:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # pytest too: a rank imports the modules of the functions it runs (test modules, suites)
    # and, when pytest was started by its script, that script; all of them import pytest.
    context.set_forkserver_preload(["pytest", "pytest_allreduce.worker"])
    return context


def start_fork_server() -> None:
    """Start the fork server now, without waiting for it: it imports torch on its own core
    while pytest finishes collecting and imports torch itself, instead of after both (1 to
    1.5 s of a CPU session's start on the 2-core development machine). Nothing to do where
    ranks are spawned."""
    context = _rank_starter()
    if context.get_start_method() == "forkserver":
        import multiprocessing.forkserver

        multiprocessing.forkserver.ensure_running()


@dataclass
class _Rank:
    rank: int
    process: Any  # multiprocessing.Process
    conn: Connection
    stack_path: Path
    stack_offset: int = 0


@dataclass
class _Replies:
    """What one wait for every rank's reply collected."""

    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    group_failed: set[int] = field(default_factory=set)
    dead: dict[int, str] = field(default_factory=dict)


@dataclass
class RankPool:
    """Persistent ranks for one world size on this host."""

    world_size: int
    device_type: str
    timeout_s: float
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    _ranks: list[_Rank] = field(default_factory=list)
    _call_id: int = 0
    broken: bool = False
    _tmpdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> RankPool:
        from . import worker

        context = _rank_starter()
        self._tmpdir = tempfile.TemporaryDirectory(prefix=leftovers.owned_prefix("pool"))
        wait_timeout = rank_wait_timeout(self.timeout_s, self.startup_timeout_s)
        environ = dict(os.environ)
        for rank in range(self.world_size):
            parent_conn, child_conn = context.Pipe()
            stack_path = Path(self._tmpdir.name) / f"rank{rank}.stacks"
            stack_path.touch()
            spec = worker.RankSpec(
                rank, self.world_size, self.device_type, wait_timeout, self._tmpdir.name, environ
            )
            process = context.Process(  # type: ignore[attr-defined]
                target=worker.rank_main,
                args=(spec, child_conn),
                name=f"allreduce-rank{rank}",
                daemon=True,
            )
            try:
                process.start()
            except BaseException:
                self.close(force=True)
                raise
            finally:
                child_conn.close()
            self._ranks.append(_Rank(rank, process, parent_conn, stack_path))
        self._collect(None, self.startup_timeout_s, "process-group start-up")
        return self

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run fn(ctx, *args) on every rank; every rank's return value, in rank order."""
        if self.broken:
            raise RuntimeError("this rank pool is broken; the session starts a new one")
        self._call_id += 1
        for r in self._ranks:
            # A dead rank is reported by _collect with its exit status.
            with contextlib.suppress(BrokenPipeError, OSError):
                r.conn.send((self._call_id, fn, args))
        return self._collect(self._call_id, self.timeout_s, getattr(fn, "__qualname__", repr(fn)))

    def _collect(self, expect: int | None, timeout: float, what: str) -> list[Any]:
        """Wait for one reply per rank. `expect` None means the start-up handshake."""
        replies = _Replies()
        grace = min(FAILURE_GRACE_S, timeout)
        deadline = time.monotonic() + timeout
        grace_deadline: float | None = None
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
                if r.rank in pending and self._receive(r, expect, replies):
                    del pending[r.rank]
            if (replies.errors or replies.dead) and grace_deadline is None:
                grace_deadline = time.monotonic() + grace

        if not (pending or replies.errors or replies.dead):
            return [replies.results[r] for r in range(self.world_size)]
        late = self._late_reports(pending, expect)
        waited = timeout if grace_deadline is None else grace
        self._fail(what, replies, late, waited, grace_deadline is not None, expect is None)

    def _receive(self, r: _Rank, expect: int | None, replies: _Replies) -> bool:
        """Take what rank `r` has for us; True once its part of this call is settled."""
        if r.conn.poll():
            try:
                message = r.conn.recv()
            except (EOFError, OSError):
                message = None
            if message is not None:
                # Anything but this call's reply is a stale reply of an abandoned call.
                return self._accept(r.rank, message, expect, replies)
            r.process.join(timeout=2)  # end of pipe: the rank is going away
        if not r.process.is_alive():
            r.process.join(timeout=1)
            replies.dead[r.rank] = describe_exit(r.process.exitcode)
            return True
        return False

    def _accept(
        self, rank: int, message: tuple[Any, ...], expect: int | None, replies: _Replies
    ) -> bool:
        if expect is None:
            kind, payload = message
            if kind == "ready":
                replies.results[rank] = None
            else:
                replies.errors[rank] = payload
            return True
        call_id, outcome, payload = message
        if call_id != expect:
            return False
        if outcome == "ok":
            replies.results[rank] = payload
        else:
            replies.errors[rank] = payload
            if outcome == "group_failed":
                replies.group_failed.add(rank)
        return True

    def _late_reports(self, pending: dict[int, _Rank], expect: int | None) -> dict[int, str]:
        """For each rank that gave no reply in time: its stacks, and its reply if it came
        while the stacks were written (so an error being reported as the bound ran out is
        shown, not lost with the killed rank)."""
        if not pending:
            return {}
        stacks = self._dump_stacks(list(pending))
        reports = {}
        for rank, r in pending.items():
            text = f"no reply: Python stacks of every thread:\n{stacks[rank]}"
            late = _Replies()
            with contextlib.suppress(EOFError, OSError):
                while r.conn.poll() and not self._accept(rank, r.conn.recv(), expect, late):
                    pass
            if rank in late.errors:
                text += f"\nit raised just after the bound:\n{late.errors[rank]}"
            elif rank in late.results:
                text += "\nit replied just after the bound"
            reports[rank] = text
        return reports

    def _fail(
        self,
        what: str,
        replies: _Replies,
        late: dict[int, str],
        waited: float,
        after_failure: bool,
        starting: bool,
    ) -> NoReturn:
        sections: dict[int, str] = {r: f"raised:\n{tb}" for r, tb in replies.errors.items()}
        for r, how in replies.dead.items():
            sections[r] = f"died: {how}"
        sections.update(late)
        parts = []
        if replies.dead:
            deaths = "; ".join(f"rank {r} {how}" for r, how in sorted(replies.dead.items()))
            parts.append(f"{deaths} during {what}")
        if replies.errors:
            parts.append(f"{what} raised on rank(s) {sorted(replies.errors)}")
        if replies.group_failed:
            parts.append(
                f"the process group reported a collective error on rank(s) "
                f"{sorted(replies.group_failed)}, so its state is unknown"
            )
        if late:
            after = " after the failure above" if after_failure else ""
            if starting:
                parts.append(
                    f"process-group start-up did not finish within {waited:g} s{after} "
                    f"(rank(s) {sorted(late)} not ready; the bound is "
                    "--allreduce-startup-timeout)"
                )
            else:
                parts.append(
                    f"rank(s) {sorted(late)} gave no reply to {what} within {waited:g} s{after}"
                )
        # Start-up failures, deaths, timeouts and collective errors all leave a group that
        # cannot be trusted; only plain exceptions raised by the function keep the pool.
        broken = bool(late or replies.dead or replies.group_failed or starting)
        if broken:
            parts.append("the rank pool was killed and will be replaced")
            self.close(force=True)
        raise RankFailure("; ".join(parts), sections, pool_broken=broken)

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        signalled = [r for r in self._ranks if r.rank in ranks and r.process.is_alive()]
        for r in signalled:
            r.stack_offset = r.stack_path.stat().st_size
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.process.pid, signal.SIGUSR1)
        # Wait until every signalled rank's dump has started and stopped growing.
        deadline = time.monotonic() + STACK_DUMP_WAIT_S
        sizes: dict[int, int] = {}
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = {r.rank: r.stack_path.stat().st_size for r in signalled}
            if all(now[r.rank] > r.stack_offset for r in signalled) and now == sizes:
                break
            sizes = now
        stacks = {}
        for r in self._ranks:
            if r.rank in ranks:
                with open(r.stack_path, errors="replace") as f:
                    f.seek(r.stack_offset)
                    stacks[r.rank] = f.read() or "(no stack dump: the rank did not answer SIGUSR1)"
        return stacks

    def close(self, force: bool = False) -> None:
        """Stop every rank: politely (teardown, bounded) unless forced, then by signal."""
        from . import worker

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
    there is no parent process here that could replace a stuck rank. The groups' own
    timeouts are longer, so that bound always fires first.
    """

    def __init__(
        self,
        device_type: str,
        timeout_s: float,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        from . import worker

        self.device_type = device_type
        self.timeout_s = timeout_s
        self.ctx = worker.init_rank_context(
            device_type, rank_wait_timeout(timeout_s, startup_timeout_s)
        )
        self.world_size = self.ctx.world_size
        self.broken = False

    @property
    def rank(self) -> int:
        return self.ctx.rank

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        import faulthandler
        import traceback

        faulthandler.dump_traceback_later(self.timeout_s, exit=True)
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
            raise RankFailure(f"{name} raised on rank(s) {sorted(errors)}", sections)
        return [payload for _, payload in outcomes]

    def close(self) -> None:
        from . import worker

        worker.close_rank_context(self.ctx)
