"""The rank pool seen through the plugin: a rank that raises, hangs or dies.

Every test here runs a small pytest session in a subprocess (pytester) whose tests send
rank functions to the session's pool through the `allreduce_session` fixture. The rank
functions live in `ranks.py` in the pytester directory: the pool's ranks are started with
the spawn method and unpickle a function by importing its module, which works because a
spawned child gets its parent's `sys.path` (and pytester puts its directory on PYTHONPATH).
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

# Rank functions, imported by the spawned ranks. Each records its pid in `pid_dir` first,
# so the outer test can check afterwards that no rank outlived the session.
RANKS_PY = '''
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _record(pid_dir):
    Path(pid_dir, str(os.getpid())).touch()


def pid_and_sum(ctx, pid_dir):
    """A real collective: proves the pool's process group works."""
    _record(pid_dir)
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t, group=ctx.cpu_group)
    return os.getpid(), t.item()


def boom(ctx, pid_dir):
    _record(pid_dir)
    if ctx.rank == 1:
        raise ValueError("rank one exploded")
    return ctx.rank


def sleep_forever_on_rank_one(ctx, pid_dir):
    _record(pid_dir)
    if ctx.rank == 1:
        time.sleep(3600)
    return ctx.rank


def sigkill_rank_one(ctx, pid_dir):
    _record(pid_dir)
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    return ctx.rank


def exit3_rank_one(ctx, pid_dir):
    _record(pid_dir)
    if ctx.rank == 1:
        os._exit(3)
    return ctx.rank
'''

# Shared by the test files below: pids of the pool that ran the first call, to compare later.
STATE_PY = """
import os

import pytest

from ranks import pid_and_sum

PID_DIR = os.environ["ALLREDUCE_TEST_PID_DIR"]
seen = {}


def healthy_pool(ranks):
    results = ranks.run(2, pid_and_sum, PID_DIR)
    assert [total for _, total in results] == [3.0, 3.0]
    return [pid for pid, _ in results]
"""

SMALL_PLAN = (
    "--allreduce-backends=gloo",
    "--allreduce-batch-sizes=1",
    "--allreduce-max-tokens=1",
    "-p",
    "no:cacheprovider",
)


def _alive(pid: int) -> bool:
    """A running (not zombie) process with this pid that is a multiprocessing child (ranks
    are forked by the fork server, so their command line is the server's)."""
    proc = Path(f"/proc/{pid}")
    try:
        status = (proc / "status").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = re.search(r"^State:\s+(\S)", status, re.M)
    if state and state.group(1) in ("Z", "X"):
        return False
    # A pid reused by an unrelated process is not one of our ranks.
    return b"multiprocessing.forkserver" in cmdline or b"spawn_main" in cmdline


@pytest.fixture
def pid_dir(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytester.makepyfile(ranks=RANKS_PY, state=STATE_PY)
    directory = pytester.path / "pids"
    directory.mkdir()
    monkeypatch.setenv("ALLREDUCE_TEST_PID_DIR", str(directory))
    return directory


def _recorded_pids(pid_dir: Path) -> set[int]:
    return {int(p.name) for p in pid_dir.iterdir()}


def _assert_no_rank_survives(pid_dir: Path, expected_at_least: int) -> None:
    pids = _recorded_pids(pid_dir)
    assert len(pids) >= expected_at_least, pids
    survivors = [pid for pid in pids if _alive(pid)]
    assert not survivors, f"rank processes outlived the pytest session: {survivors}"


def _failure_section(output: str, test_name: str) -> str:
    """The text of one test's entry in the FAILURES section."""
    match = re.search(
        rf"_{{3,}} {re.escape(test_name)} _{{3,}}\n(.*?)(?=\n_{{3,}} |\n={{3,}} )", output, re.S
    )
    assert match, f"no failure section for {test_name}:\n{output}"
    return match.group(1)


def test_rank_exception_is_reported_with_its_traceback_and_the_pool_survives(
    pytester: pytest.Pytester, pid_dir: Path
) -> None:
    pytester.makepyfile(
        test_boom=textwrap.dedent(
            """
            from ranks import boom
            from state import PID_DIR, healthy_pool, seen


            def test_first(allreduce_session, allreduce_ranks):
                seen["pids"] = healthy_pool(allreduce_ranks)
                assert allreduce_session.engine.pool_starts == 1


            def test_boom(allreduce_session, allreduce_ranks):
                allreduce_ranks.run(2, boom, PID_DIR)


            def test_same_pool_afterwards(allreduce_session, allreduce_ranks):
                # Every rank replied (one with a traceback): the pool is kept.
                assert healthy_pool(allreduce_ranks) == seen["pids"]
                assert allreduce_session.engine.pool_starts == 1
            """
        )
    )
    result = pytester.runpytest_subprocess(*SMALL_PLAN, "--allreduce-timeout=60", timeout=180)
    result.assert_outcomes(passed=2, failed=1)
    output = result.stdout.str()
    section = _failure_section(output, "test_boom")
    assert "boom raised on rank(s) [1]" in section
    assert "---- rank 1 ----" in section
    assert "Traceback (most recent call last)" in section
    assert re.search(r"ranks\.py\", line \d+, in boom", section)
    assert "ValueError: rank one exploded" in section
    # Rank 0 returned normally: it gets no section and is not named as failing.
    assert "---- rank 0 ----" not in section
    assert "rank(s) [0" not in section
    assert "will be replaced" not in section
    # The per-rank report is shown once, not again as the context of pytest's Failed.
    assert section.count("---- rank 1 ----") == 1, section
    assert "During handling of the above exception" not in section
    _assert_no_rank_survives(pid_dir, expected_at_least=2)


def _breaking_session(rank_function: str, test_name: str) -> str:
    """A healthy test, then `test_name` running `rank_function` (which breaks the pool),
    then a test that must pass on a fresh pool with new rank processes."""
    return textwrap.dedent(
        f"""
        from ranks import {rank_function}
        from state import PID_DIR, healthy_pool, seen


        def test_first(allreduce_session, allreduce_ranks):
            seen["pids"] = healthy_pool(allreduce_ranks)


        def {test_name}(allreduce_session, allreduce_ranks):
            allreduce_ranks.run(2, {rank_function}, PID_DIR)


        def test_fresh_pool_afterwards(allreduce_session, allreduce_ranks):
            pids = healthy_pool(allreduce_ranks)
            assert allreduce_session.engine.pool_starts == 2
            assert not set(pids) & set(seen["pids"])
        """
    )


def test_hung_rank_times_out_with_its_stack_and_a_fresh_pool_follows(
    pytester: pytest.Pytester, pid_dir: Path
) -> None:
    pytester.makepyfile(test_hang=_breaking_session("sleep_forever_on_rank_one", "test_hang"))
    start = time.monotonic()
    # The call bound; the pool's start-up has its own (--allreduce-startup-timeout).
    result = pytester.runpytest_subprocess(*SMALL_PLAN, "--allreduce-timeout=5", timeout=120)
    elapsed = time.monotonic() - start
    result.assert_outcomes(passed=2, failed=1)
    section = _failure_section(result.stdout.str(), "test_hang")
    assert "rank(s) [1] gave no reply to sleep_forever_on_rank_one within 5 s" in section
    assert "the rank pool was killed and will be replaced" in section
    assert "---- rank 1 ----" in section
    assert "---- rank 0 ----" not in section
    # faulthandler's dump of the hung rank, down to the function that hangs.
    assert "Python stacks of every thread" in section
    assert re.search(r"ranks\.py\", line \d+ in sleep_forever_on_rank_one", section), section
    assert elapsed < 60, f"the session took {elapsed:.0f} s"
    _assert_no_rank_survives(pid_dir, expected_at_least=4)


@pytest.mark.parametrize(
    ("function", "how"),
    [
        ("sigkill_rank_one", "rank 1 killed by signal SIGKILL"),
        ("exit3_rank_one", "rank 1 exited with status 3"),
    ],
)
def test_dead_rank_is_named_and_a_fresh_pool_follows(
    pytester: pytest.Pytester, pid_dir: Path, function: str, how: str
) -> None:
    pytester.makepyfile(test_die=_breaking_session(function, "test_die"))
    start = time.monotonic()
    result = pytester.runpytest_subprocess(*SMALL_PLAN, "--allreduce-timeout=60", timeout=180)
    elapsed = time.monotonic() - start
    result.assert_outcomes(passed=2, failed=1)
    section = _failure_section(result.stdout.str(), "test_die")
    assert f"{how} during {function}" in section
    assert "---- rank 1 ----" in section
    assert "---- rank 0 ----" not in section
    assert "the rank pool was killed and will be replaced" in section
    # The dead rank is noticed at once, not after the 60 s call timeout.
    assert elapsed < 50, f"the session took {elapsed:.0f} s"
    _assert_no_rank_survives(pid_dir, expected_at_least=4)
