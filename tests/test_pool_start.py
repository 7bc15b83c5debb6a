"""Starting a pool: bounded on its own and reported as start-up; ranks from the fork server,
or spawned where the temp dir is too long for the fork server's socket."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pytest_allreduce.pool import RankFailure, RankPool


def _stop_rank_one_when_started(done: threading.Event) -> None:
    while not done.is_set():
        for child in multiprocessing.active_children():
            if child.name == "allreduce-rank1" and child.pid is not None:
                os.kill(child.pid, signal.SIGSTOP)
                return
        time.sleep(0.001)


def test_start_up_has_its_own_bound_and_is_reported_as_start_up() -> None:
    done = threading.Event()
    stopper = threading.Thread(target=_stop_rank_one_when_started, args=(done,))
    stopper.start()
    pool = RankPool(2, "cpu", timeout_s=60.0, startup_timeout_s=2.0)
    started = time.monotonic()
    try:
        with pytest.raises(RankFailure) as failure:
            pool.start()
    finally:
        done.set()
        stopper.join()
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
