"""The output dir: one writing session at a time, and each run's artifacts swapped in together.

`OutputDir.claim` takes the dir's lock file (`.pytest-allreduce.lock`, an flock the kernel
drops when its holder dies, holding the holder's pid for the message a second session gets),
then repairs what a killed session left: an interrupted commit is finished or undone, and
atomic writers' temp files of dead sessions are removed.

A run's artifacts are written into a staging dir inside the output dir
(`.pytest-allreduce-staging-<pid>-*`, same file system, so moving a file is a rename), then
`commit` moves them into place:

1. every staged file and dir is fsynced;
2. the journal (the list of staged files) is written into the staging dir by rename: from
   this instant the new set is complete and will be installed;
3. each file is renamed over its place in the output dir;
4. the staging dir is removed.

A kill -9 before step 2 leaves a staging dir without a journal: the next claim deletes it
and the output dir still holds the old set, untouched. A kill -9 after it leaves a journal:
the next claim finishes step 3 (a file already moved is simply no longer in the staging
dir) and the output dir holds the new set. Files of the output dir that the run did not
write (other world sizes or hidden sizes, the user's own files) are never touched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath
from types import TracebackType

from .leftovers import OWNER_TAG, pid_running

LOCK_NAME = f".{OWNER_TAG}.lock"
STAGING_PREFIX = f".{OWNER_TAG}-staging-"
JOURNAL_NAME = ".commit.json"
_STAGING_NAME = re.compile(rf"{re.escape(STAGING_PREFIX)}(?P<pid>[0-9]+)-.+", re.ASCII)
_TEMP_FILE_NAME = re.compile(
    rf"\..+\.{re.escape(OWNER_TAG)}-(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp", re.ASCII
)


class OutputDirError(Exception):
    """The output dir cannot be used; the message names it and says why."""


class OutputDirBusy(OutputDirError):
    """Another live session holds the output dir's lock."""


def temp_file_prefix(target: Path) -> str:
    """The mkstemp prefix for an atomic write of `target` (suffix ".tmp"): it carries this
    process's pid, so a later session can tell a dead writer's temp file from a live one's."""
    return f".{target.name}.{OWNER_TAG}-{os.getpid()}."


def sweep_temp_files(directory: Path) -> list[Path]:
    """Remove atomic writers' temp files of dead sessions (ours by name, uid and pid) from
    `directory` itself (not below it). Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_FILE_NAME.fullmatch(entry.name)
        if match is None or pid_running(int(match["pid"])):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return removed


class OutputDir:
    """This session's exclusive hold on one output dir (see the module docstring)."""

    def __init__(self, path: Path, lock_fd: int, repairs: list[str]) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd
        self.repairs = repairs  # what claim() found and fixed, for the session's notes

    @classmethod
    def claim(cls, path: str | os.PathLike[str]) -> OutputDir:
        """Create the dir if needed, lock it, and repair what a killed session left.

        Raises OutputDirBusy naming the holder's pid when a live session holds the lock,
        OutputDirError when the dir cannot be created, locked or repaired.
        """
        directory = Path(path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputDirError(f"{directory}: cannot create it ({exc.strerror})") from None
        fd = _lock(directory)
        try:
            repairs = recover(directory)
            for folder in [directory, *_subdirs(directory)]:
                removed = sweep_temp_files(folder)
                repairs += [f"removed {p}, a killed session's temp file" for p in removed]
        except BaseException:
            _unlock(directory, fd)
            raise
        return cls(directory, fd, repairs)

    def stage(self) -> Staging:
        """A new staging dir for this run's artifacts."""
        if self._lock_fd is None:
            raise OutputDirError(f"{self.path}: released; claim it again to write")
        return Staging(self.path)

    def release(self) -> None:
        if self._lock_fd is not None:
            _unlock(self.path, self._lock_fd)
            self._lock_fd = None


class Staging:
    """Where one run's artifacts are written before they are swapped in together.

    Use as a context manager: leaving the block without `commit()` (an exception, or a
    writer that gave up) throws the staged files away and leaves the output dir as it was.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.root = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir))
        self._done = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._done:
            self.discard()

    def path(self, relative: str | os.PathLike[str]) -> Path:
        """Where the writer writes the artifact that belongs at output_dir/relative."""
        parts = _relative_parts(relative)
        target = self.root.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self) -> list[Path]:
        """Move every staged file into place (see the module docstring); their final paths."""
        if self._done:
            raise OutputDirError(f"{self.root}: already committed or discarded")
        files = _staged_files(self.root)
        for relative in files:
            place = self.output_dir / relative
            if place.is_dir() and not place.is_symlink():
                raise OutputDirError(f"cannot write {place}: a directory is in its place")
        for relative in files:
            _fsync_path(self.root / relative)
        for folder in {(self.root / relative).parent for relative in files} | {self.root}:
            _fsync_path(folder)
        _write_journal(self.root, files)
        _install(self.root, self.output_dir, files)
        shutil.rmtree(self.root)
        self._done = True
        return [self.output_dir / relative for relative in files]

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._done = True


def recover(directory: Path) -> list[str]:
    """Finish or undo the commits that dead sessions left in `directory` (call under the
    lock; OutputDir.claim does). Returns a note per staging dir handled."""
    notes: list[str] = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        match = _STAGING_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if entry.stat(follow_symlinks=False).st_uid != os.getuid() or pid_running(pid):
            continue
        root = Path(entry.path)
        files = _read_journal(root)
        if files is None:
            shutil.rmtree(root)
            notes.append(f"discarded the unfinished artifacts of killed session {pid}")
            continue
        _install(root, directory, files)
        shutil.rmtree(root)
        notes.append(f"completed the interrupted commit of {len(files)} file(s) of session {pid}")
    return notes


# ---- the lock ----------------------------------------------------------------------------


def _lock(directory: Path) -> int:
    path = directory / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputDirError(f"{directory}: cannot open {LOCK_NAME} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputDirBusy(
                    f"{directory} is in use by another pytest-allreduce session ({holder}); "
                    "wait for it to end or choose another output dir"
                ) from None
            raise OutputDirError(f"{directory}: cannot lock {LOCK_NAME} ({exc.strerror})") from None
        # The previous holder unlinks the file as it releases it; a lock taken on that
        # unlinked file would exclude nobody, so it must still be the file at the path.
        try:
            current = os.stat(path, follow_symlinks=False)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid not yet recorded"


def _unlock(directory: Path, fd: int) -> None:
    try:
        os.unlink(directory / LOCK_NAME)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


# ---- staging and installing --------------------------------------------------------------


def _relative_parts(relative: str | os.PathLike[str]) -> tuple[str, ...]:
    pure = PurePosixPath(os.fspath(relative))
    parts = pure.parts
    if pure.is_absolute() or not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{os.fspath(relative)!r} is not a plain path inside the output dir")
    if parts == (JOURNAL_NAME,):
        raise ValueError(f"{JOURNAL_NAME!r} is reserved for the commit journal")
    return parts


def _staged_files(root: Path) -> list[str]:
    files = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            raise OutputDirError(f"{path}: staged artifacts must be regular files")
        files.append(path.relative_to(root).as_posix())
    return files


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_journal(root: Path, files: list[str]) -> None:
    temporary = root / f"{JOURNAL_NAME}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, root / JOURNAL_NAME)
    _fsync_path(root)


def _read_journal(root: Path) -> list[str] | None:
    """The journal's file list, or None when there is none (the commit never started).

    The journal appears by rename, so it is either absent or whole; one that does not parse
    was not written by this module and is treated as absent.
    """
    try:
        doc = json.loads((root / JOURNAL_NAME).read_text(encoding="utf-8"))
        files = doc["files"]
        for relative in files:
            _relative_parts(relative)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return [str(f) for f in files]


def _install(root: Path, output_dir: Path, files: list[str]) -> None:
    """Rename each staged file still in `root` over its place (idempotent: rerunning after a
    crash skips the files already moved)."""
    touched = {output_dir}
    for relative in files:
        source = root.joinpath(*_relative_parts(relative))
        if not os.path.lexists(source):
            continue
        place = output_dir.joinpath(*_relative_parts(relative))
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, place)
        except OSError as exc:
            raise OutputDirError(f"cannot move {source} to {place} ({exc.strerror})") from None
        # New subdirectories must reach the disk too, each in its own parent's entry.
        touched.update(p for p in place.parents if p.is_relative_to(output_dir))
    for folder in touched:
        _fsync_path(folder)


def _subdirs(directory: Path) -> list[Path]:
    try:
        return [
            Path(e.path)
            for e in os.scandir(directory)
            if e.is_dir(follow_symlinks=False) and not _STAGING_NAME.fullmatch(e.name)
        ]
    except OSError:
        return []
