"""Nothing left behind: what a killed pytest leaves is gone after the next session's start.

The sweep removes only what is provably a dead session's of this plugin (name, owner uid,
owning pid not running); everything else in the temp dir and /dev/shm stays. The kill -9
test runs the real suites with the cpu_shm backend in a pytest subprocess whose temp dir is
private, kills pytest (only the pytest process: its fork server and ranks must go by
themselves), then runs the sweep the next session runs at its start.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_allreduce.leftovers import owned_prefix, pid_running, sweep_stale_resources
from pytest_allreduce.pool import RankFailure, RankPool

SHM = Path("/dev/shm")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private temp dir with a short path (the fork server's socket path is bounded)."""
    path = Path(tempfile.mkdtemp(prefix="ar-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def test_sweep_removes_only_dead_sessions_resources_of_this_plugin(short_tmp: Path) -> None:
    dead, live = _dead_pid(), os.getpid()
    stale = [
        short_tmp / f"pytest-allreduce-pool-{dead}-abc123",
        short_tmp / "pymp-dead1234",
    ]
    kept = [
        short_tmp / f"pytest-allreduce-pool-{live}-def456",  # a live session's
        short_tmp / "pytest-allreduce-shm-k2j3h4",  # no owner pid in the name: not provable
        short_tmp / "pymp-nomarker",  # another program's multiprocessing dir
        short_tmp / "pymp-livemark",
        short_tmp / "unrelated",
    ]
    for path in stale + kept:
        path.mkdir()
        (path / "content").write_text("x")
    (short_tmp / "pymp-dead1234" / f"pytest-allreduce-owner-{dead}").touch()
    (short_tmp / "pymp-livemark" / f"pytest-allreduce-owner-{live}").touch()
    link = short_tmp / f"pytest-allreduce-pool-{dead}-link"
    link.symlink_to(short_tmp / "unrelated")
    kept.append(link)
    if os.getuid() == 0:
        foreign = short_tmp / f"pytest-allreduce-pool-{dead}-foreign"
        foreign.mkdir()
        os.chown(foreign, 4242, 4242)
        kept.append(foreign)
    shm_stale = SHM / f"pytest-allreduce-test-{dead}-x1"
    if SHM.is_dir():
        shm_stale.write_bytes(b"segment")
        stale.append(shm_stale)

    removed = sweep_stale_resources(short_tmp)

    assert sorted(removed) == sorted(stale)
    assert not [p for p in stale if os.path.lexists(p)]
    assert all(os.path.lexists(p) for p in kept)
    assert (short_tmp / "unrelated" / "content").exists()  # not followed through the link


def test_owned_names_carry_this_pid() -> None:
    assert owned_prefix("pool") == f"pytest-allreduce-pool-{os.getpid()}-"
    with pytest.raises(ValueError):
        owned_prefix("Pool-1")


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (our session's TMPDIR setting)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in environ and pid_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def _plugin_names(directory: Path) -> set[str]:
    try:
        return {n for n in os.listdir(directory) if n.startswith(("pytest-allreduce", "pymp-"))}
    except FileNotFoundError:
        return set()


@pytest.mark.parametrize("delay_s", [0.5, 2.0, 4.0])
def test_kill_9_of_pytest_mid_run_leaves_nothing_after_the_next_start(
    pytester: pytest.Pytester, short_tmp: Path, delay_s: float
) -> None:
    shm_before = _plugin_names(SHM)
    marker = f"TMPDIR={short_tmp}"
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "pytest_allreduce.suites",
        "--allreduce-backends=cpu_shm,gloo",
        "--allreduce-batch-sizes=1,8,64",
        "--allreduce-max-tokens=64",
        "--allreduce-output-dir=out",
    ]
    session = subprocess.Popen(
        command, cwd=pytester.path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith("pytest-allreduce-pool-") for n in os.listdir(short_tmp)):
            assert session.poll() is None, "the session ended before its pool started"
            assert time.monotonic() < deadline, "no pool started within 120 s"
            time.sleep(0.05)
        time.sleep(delay_s)
        assert session.poll() is None, "the session ended before it was killed"
    finally:
        session.kill()
        session.wait()
    # The killed session's fork server and ranks notice and exit by themselves.
    deadline = time.monotonic() + 30
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []

    # Left for the sweep at least: multiprocessing's dir of the killed pytest (the fork
    # server's socket is in it).
    assert [n for n in os.listdir(short_tmp) if n.startswith("pymp-")]

    sweep_stale_resources(short_tmp)  # what the next session does at its start

    left = [n for n in os.listdir(short_tmp) if not n.startswith("pytest-of-")]
    assert left == []
    assert _plugin_names(SHM) <= shm_before


def test_ranks_of_a_killed_pytest_remove_their_pool_dir(short_tmp: Path) -> None:
    marker = f"TMPDIR={short_tmp}"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from pytest_allreduce.pool import RankPool\n"
            "pool = RankPool(2, 'cpu', 30.0).start()\n"
            "print('started', flush=True)\n"
            "time.sleep(600)\n",
        ],
        env={**os.environ, "TMPDIR": str(short_tmp)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "started\n"
        pool_dirs = [n for n in os.listdir(short_tmp) if n.startswith("pytest-allreduce-pool-")]
        assert len(pool_dirs) == 1
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []
    assert not (short_tmp / pool_dirs[0]).exists()


def cpu_shm_setup(ctx: Any, die_on: int | None) -> list[str]:
    """Set up cpu_shm; rank `die_on` exits right after learning where the segment is."""
    import torch
    from pytest_allreduce.backends.cpu_shm import CpuShmBackend

    view = dataclasses.replace(ctx)
    gather = ctx.all_gather_object

    def gather_then_die(obj: Any) -> list[Any]:
        gathered = gather(obj)
        if ctx.rank == die_on:
            os._exit(3)
        return gathered

    view.all_gather_object = gather_then_die
    backend = CpuShmBackend(view, "", 64, torch.float32, 4)
    maps = Path("/proc/self/maps").read_text().splitlines()
    backend.close()
    return [line.split(maxsplit=5)[-1] for line in maps if "pytest-allreduce-cpu-shm" in line]


def test_cpu_shm_names_nothing_in_dev_shm_even_when_a_rank_dies_in_set_up() -> None:
    before = set(os.listdir(SHM))
    pool = RankPool(2, "cpu", 30.0).start()
    try:
        mappings = pool.run(cpu_shm_setup, None)
        # Mapped by every rank from a memfd, which has no name in any file system.
        assert all(m and all(name.startswith("/memfd:") for name in m) for m in mappings)
        with pytest.raises(RankFailure, match="rank 1 exited with status 3"):
            pool.run(cpu_shm_setup, 1)
    finally:
        pool.close(force=True)
    assert set(os.listdir(SHM)) <= before
