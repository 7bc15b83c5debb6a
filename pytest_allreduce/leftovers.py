"""What this plugin leaves outside its own process, and the sweep for what a kill -9 left.

Every temp dir and temp file the plugin creates outside the output dir's own contents is
named `pytest-allreduce-<kind>-<pid>-...` with the pid of the pytest process that owns it.
A session's normal end removes its own; when pytest is killed, its ranks remove the pool's
temp dir as they exit (see worker.py), and what is still left is swept at the next session's
start. The sweep removes only what is provably ours and orphaned: our name prefix, owned by
our uid, and an owning pid that no longer runs. A live session's resources are never touched,
and neither is anything of another user's or another program's.

multiprocessing's own temp dir (`pymp-*`, which holds the fork server's socket) cannot be
named by us, so the pytest process drops an owner marker into it; the sweep removes a
`pymp-*` dir only when it holds such a marker of a dead pid.
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

OWNER_TAG = "pytest-allreduce"
_OWNED_NAME = re.compile(rf"{OWNER_TAG}-[a-z]+-(?P<pid>[0-9]+)-.+", re.ASCII)
_MARKER_NAME = re.compile(rf"{OWNER_TAG}-owner-(?P<pid>[0-9]+)", re.ASCII)
_SHM_DIR = Path("/dev/shm")


def owned_prefix(kind: str) -> str:
    """The name prefix for a temp resource of this process (`kind`: lower-case letters)."""
    if not kind.isascii() or not kind.isalpha() or not kind.islower():
        raise ValueError(f"resource kind must be lower-case ASCII letters, got {kind!r}")
    return f"{OWNER_TAG}-{kind}-{os.getpid()}-"


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie.

    A zombie counts as dead: a pytest killed with SIGKILL stays a zombie until its parent
    reaps it, and its resources are already orphaned then. A pid reused by an unrelated
    process counts as running, which only keeps a leftover longer, never removes a live one.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and nothing of ours
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] not in ("Z", "X")


def mark_multiprocessing_temp_dir() -> None:
    """Claim this process's multiprocessing temp dir (creating it) for the sweep.

    The fork server that starts pool ranks listens on a socket in that dir; multiprocessing
    removes the dir at a normal exit, a killed pytest leaves it.
    """
    marker = Path(multiprocessing.util.get_temp_dir(), f"{OWNER_TAG}-owner-{os.getpid()}")
    if not marker.exists():
        marker.touch(mode=0o600)


def _orphaned(entry: os.DirEntry[str], pattern: re.Pattern[str]) -> bool:
    match = pattern.fullmatch(entry.name)
    if match is None:
        return False
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    if info.st_uid != os.getuid() or stat.S_ISLNK(info.st_mode):
        return False
    return not pid_running(int(match["pid"]))


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False  # removed meanwhile by the dead session's last rank
    return True


def _stale_multiprocessing_dir(entry: os.DirEntry[str]) -> bool:
    if not entry.name.startswith("pymp-"):
        return False
    try:
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        inside = list(os.scandir(entry.path))
    except OSError:
        return False
    return any(_orphaned(e, _MARKER_NAME) for e in inside)


def sweep_stale_resources(temp_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove what killed pytest sessions of this user left in the temp dir and /dev/shm.

    Call once at session start. `temp_dir` defaults to tempfile.gettempdir(). Returns what
    was removed; never raises for a resource it cannot inspect or remove (it stays).
    """
    base = Path(temp_dir) if temp_dir is not None else Path(tempfile.gettempdir())
    removed: list[Path] = []
    for directory in (base, _SHM_DIR):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            stale = _orphaned(entry, _OWNED_NAME) or (
                directory == base and _stale_multiprocessing_dir(entry)
            )
            if stale:
                with contextlib.suppress(OSError):
                    if _remove(Path(entry.path)):
                        removed.append(Path(entry.path))
    return removed
