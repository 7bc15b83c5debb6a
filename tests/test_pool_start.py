"""Starting a pool: bounded on its own and reported as start-up; ranks from the fork server,
which starts when collection ends, or spawned where the temp dir is too long for the fork
server's socket; CPU ranks that keep freed memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.context import ForkServerProcess
from pathlib import Path

import pytest

from pytest_allreduce.pool import RankFailure, RankPool


def test_start_up_has_its_own_bound_and_is_reported_as_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rank 1 is stopped the moment the fork server has forked it, before it can reach the
    # rendezvous. (A thread polling for it could miss that window: from a warm fork server
    # both ranks can rendezvous within a millisecond.)
    start = ForkServerProcess.start

    def start_then_stop_rank_one(process: ForkServerProcess) -> None:
        start(process)
        if process.name == "allreduce-rank1" and process.pid is not None:
            os.kill(process.pid, signal.SIGSTOP)

    monkeypatch.setattr(ForkServerProcess, "start", start_then_stop_rank_one)
    pool = RankPool(2, "cpu", timeout_s=60.0, startup_timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        pool.start()
    elapsed = time.monotonic() - started
    report = str(failure.value)
    assert "process-group start-up did not finish within 2 s" in report, report
    # Rank 0 waits for rank 1 in the rendezvous: both are not ready, rank 0's stack says where.
    assert "rank(s) [0, 1] not ready" in report, report
    assert "in init_rank_context" in report.split("---- rank 0 ----")[1], report
    assert "--allreduce-startup-timeout" in report
    assert "the rank pool was killed and will be replaced" in report
    assert pool.broken and elapsed < 30


LONG_TMP_SCRIPT = """
import os
from pathlib import Path
from pytest_allreduce.pool import RankPool

def rank_pid(ctx):
    return os.getpid()

if __name__ == "__main__":
    pool = RankPool(2, "cpu", 60.0).start()
    pids = pool.run(rank_pid)
    print(Path(f"/proc/{pids[0]}/cmdline").read_bytes().replace(b"\\0", b" ").decode())
    pool.close()
"""


def test_a_temp_dir_too_long_for_the_fork_server_socket_spawns_ranks(tmp_path: Path) -> None:
    long_tmp = Path(tempfile.mkdtemp(prefix="ar-" + "x" * 90, dir="/tmp"))
    try:
        script = tmp_path / "long_tmp.py"
        script.write_text(LONG_TMP_SCRIPT)
        done = subprocess.run(
            [sys.executable, str(script)],
            env={**os.environ, "TMPDIR": str(long_tmp)},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "spawn_main" in done.stdout, done.stdout
        assert os.listdir(long_tmp) == []  # the pool's and multiprocessing's dirs are gone
    finally:
        os.rmdir(long_tmp)


TEST_FIRST_PY = """
import os

import pytest

from pytest_allreduce import checks

pytestmark = pytest.mark.allreduce_suite("numerics")


def test_exact_sum(allreduce):
    reports = allreduce.run(checks.exact_sum, allreduce.case.batch_size)
    assert not [p for r in reports for p in r.problems]
    # The ranks came from the fork server the session started when collection ended.
    assert reports and os.environ["FORK_SERVER_AT_SETUP"] != "none"
"""

CONFTEST_PY = """
import multiprocessing.forkserver
import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before any fixture of the first test has started a pool.
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    os.environ.setdefault("FORK_SERVER_AT_SETUP", str(pid) if pid else "none")


def pytest_sessionfinish(session):
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    print(f"fork server at the end: {pid or 'none'}")
"""


def test_the_fork_server_starts_when_collection_ends(pytester: pytest.Pytester) -> None:
    """The fork server imports torch while the first test is set up, not after: it is
    running before any pool starts, and collecting alone starts nothing."""
    pytester.makeini("[pytest]\n")
    pytester.makeconftest(CONFTEST_PY)
    pytester.makepyfile(test_first=TEST_FIRST_PY)
    common = (
        "-p",
        "no:cacheprovider",
        "--allreduce-backends=gloo",
        "--allreduce-hidden-sizes=64",
        "--allreduce-batch-sizes=1",
        "--allreduce-timeout=60",
        "--allreduce-output-dir=out",
    )
    ran = pytester.runpytest_subprocess(*common, timeout=240)
    assert ran.ret == pytest.ExitCode.OK, ran.stdout.str()
    assert ran.parseoutcomes()["passed"] > 0

    collected = pytester.runpytest_subprocess(*common, "--collect-only", "-s", timeout=240)
    assert collected.ret == pytest.ExitCode.OK, collected.stdout.str()
    assert "fork server at the end: none" in collected.stdout.str()


def test_pool_ranks_keep_freed_memory() -> None:
    """glibc gives a rank's large blocks from its heap (below the program break), not from
    fresh mappings that fault in every page each time a tensor is made."""
    pool = RankPool(2, "cpu", 60.0).start()
    try:
        assert pool.run(_large_block_in_heap) == [True, True]
    finally:
        pool.close()


def _large_block_in_heap(ctx: object) -> bool:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    block = libc.malloc(64 << 20)
    try:
        return bool(block) and block < libc.sbrk(0)
    finally:
        libc.free(ctypes.c_void_p(block))
