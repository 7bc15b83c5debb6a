"""The output dir: one writer at a time, and a run's artifacts swapped in as one set.

The crash tests kill a writer (SIGKILL, in a subprocess) before every file system change its
commit makes, and at random moments of a loop of commits, then let the next claim recover:
the output dir must then hold the old set or the new set of files, complete, and nothing
else of the plugin's; files that were not part of the set are never touched.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_allreduce.outputdir import (
    LOCK_NAME,
    STAGING_PREFIX,
    OutputDir,
    OutputDirBusy,
    OutputDirError,
    sweep_temp_files,
    temp_file_prefix,
)

OLD = {"tp2/config.json": "old config", "tp2/report.md": "old report", "benchmark.json": "old"}
NEW = {
    "tp2/config.json": "new config",
    "tp2/report.md": "new report",
    "benchmark.json": "new",
    "tp2/plot.png": "new plot",  # only in the new set
}
UNRELATED = {"tp4/config.json": "another world size", "notes.txt": "the user's own file"}


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def _read(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _plugin_leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith((STAGING_PREFIX, LOCK_NAME))]


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_claim_commit_and_release(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, {**OLD, **UNRELATED})
    claimed = OutputDir.claim(out)
    assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with claimed.stage() as staging:
        for relative, text in NEW.items():
            staging.path(relative).write_text(text)
        assert {r: (out / r).read_text() for r in OLD} == OLD  # nothing moved yet
        written = staging.commit()
    assert sorted(written) == sorted(out / r for r in NEW)
    claimed.release()
    assert _read(out) == {**NEW, **UNRELATED}
    assert _plugin_leftovers(out) == []


def test_leaving_the_stage_without_commit_keeps_the_old_set(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, OLD)
    claimed = OutputDir.claim(out)
    with pytest.raises(RuntimeError), claimed.stage() as staging:
        staging.path("tp2/config.json").write_text("half of a new set")
        raise RuntimeError("the writer failed")
    claimed.release()
    assert _read(out) == OLD


@pytest.mark.parametrize("bad", ["/abs.json", "../up.json", "tp2/../../up.json", "", "."])
def test_staging_refuses_paths_outside_the_output_dir(tmp_path: Path, bad: str) -> None:
    claimed = OutputDir.claim(tmp_path / "out")
    with claimed.stage() as staging, pytest.raises(ValueError, match="not a plain path"):
        staging.path(bad)
    claimed.release()


def test_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pytest_allreduce.outputdir import OutputDir\n"
            "OutputDir.claim(sys.argv[1]); print('held', flush=True); time.sleep(600)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(
            OutputDirBusy, match=rf"another pytest-allreduce session \(pid {holder.pid}\)"
        ):
            OutputDir.claim(out)
    finally:
        holder.kill()
        holder.wait()
    claimed = OutputDir.claim(out)  # the kernel dropped the dead holder's lock
    assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(OutputDirBusy, match=rf"pid {os.getpid()}"):
        OutputDir.claim(out)  # one writer, even within one process
    claimed.release()
    assert not (out / LOCK_NAME).exists()


def test_claim_of_an_unusable_dir_says_why(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="cannot create it"):
        OutputDir.claim(tmp_path / "file" / "out")


CRASHING_COMMIT = """
    import os, shutil, signal, sys
    from pytest_allreduce.outputdir import OutputDir

    out, crash_at, new = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])
    claimed = OutputDir.claim(out)
    staging = claimed.stage()
    for relative, text in new.items():
        staging.path(relative).write_text(text)
    calls = 0

    def crashing(change):
        def wrapped(*args, **kwargs):
            global calls
            calls += 1
            if calls == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return change(*args, **kwargs)
        return wrapped

    for name in ("replace", "fsync", "mkdir", "unlink", "rmdir"):
        setattr(os, name, crashing(getattr(os, name)))
    staging.commit()
    print("committed", calls)
"""


def _one_complete_set(out: Path) -> str:
    files = _read(out)
    assert {k: files.pop(k) for k in UNRELATED} == UNRELATED
    if files == OLD:
        return "old"
    assert files == NEW, files
    return "new"


def test_kill_before_every_change_of_a_commit_leaves_one_complete_set(tmp_path: Path) -> None:
    outcomes = []
    crash_at = 1
    while True:
        out = tmp_path / f"out{crash_at}"
        _write(out, {**OLD, **UNRELATED})
        done = _run(CRASHING_COMMIT, str(out), str(crash_at), repr(NEW))
        if done.returncode == 0:
            assert done.stdout.startswith("committed"), done.stdout
            break
        assert done.returncode == -9, done.stderr
        OutputDir.claim(out).release()  # the next session's start-up recovery
        outcomes.append(_one_complete_set(out))
        assert _plugin_leftovers(out) == []
        crash_at += 1
    # Early kills leave the old set, kills after the journal the new one; both happen.
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    assert len(outcomes) >= 10, outcomes


LOOPING_WRITER = """
    import sys
    from pytest_allreduce.outputdir import OutputDir

    out, names = sys.argv[1], eval(sys.argv[2])
    claimed = OutputDir.claim(out)
    print("claimed", flush=True)
    for run in range(100000):
        with claimed.stage() as staging:
            for name in names:
                staging.path(name).write_text(f"run {run} " + "x" * 200000)
            staging.commit()
"""


def test_kill_at_random_moments_of_repeated_commits_leaves_one_complete_set(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    _write(out, UNRELATED)
    rng = random.Random(4)
    runs_seen = set()
    for _ in range(20):
        writer = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(LOOPING_WRITER), str(out), repr(list(NEW))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None and writer.stdout.readline() == "claimed\n"
        time.sleep(rng.uniform(0.0, 0.3))
        writer.kill()
        writer.wait()
        OutputDir.claim(out).release()
        files = _read(out)
        assert {k: files.pop(k) for k in UNRELATED} == UNRELATED
        runs = {text.split(" ")[1] for text in files.values()}
        assert not files or (set(files) == set(NEW) and len(runs) == 1), (files.keys(), runs)
        runs_seen |= runs
        assert _plugin_leftovers(out) == []
    assert len(runs_seen) > 1  # the kills did land in different runs


def test_temp_files_of_dead_writers_are_swept_and_others_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    target = tmp_path / "config.json"
    dead_temp = tmp_path / f".config.json.pytest-allreduce-{dead_pid}.abcd1234.tmp"
    live_temp = tmp_path / f"{temp_file_prefix(target)}efgh5678.tmp"
    foreign = tmp_path / ".config.json.abcd1234.tmp"  # an atomic writer without our tag
    other_user = tmp_path / f".x.json.pytest-allreduce-{dead_pid}.ijkl9012.tmp"
    for path in (dead_temp, live_temp, foreign, other_user):
        path.write_text("partial")
    if os.getuid() == 0:
        os.chown(other_user, 4242, 4242)
        kept = {live_temp, foreign, other_user}
    else:
        kept = {live_temp, foreign}
    removed = sweep_temp_files(tmp_path)
    assert dead_temp in removed and not dead_temp.exists()
    assert {p for p in tmp_path.iterdir()} >= kept
