"""Checks of the paths users name, made before anything is read or written.

A path from an option or a config loader can be anything: a FIFO (reading blocks until a
writer comes), a device (/dev/zero never ends; /dev/null swallows a baseline and, as root,
would be replaced by a regular file), a directory, a file standing where a directory must
be, or a name too long for the file system. These functions say what is wrong in words
that name the path, or read a file only once it is known to be a bounded regular file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096


class UnusableFile(ValueError):
    """A file that cannot be read as asked; the message starts with its path."""


def file_kind(mode: int) -> str:
    """What kind of file a stat mode describes, in words."""
    kinds = (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; UnusableFile naming it otherwise.

    Never blocks and never reads without bound: the path is stat'ed before it is opened (so
    a device is not even opened), opened with O_NONBLOCK (so a FIFO put in its place since
    then does not wait for a writer), checked again on the open descriptor, and read only up
    to the bound.
    """
    path = Path(path)
    try:
        before = os.stat(path)
    except ValueError:
        raise UnusableFile(f"{os.fspath(path)!r}: the path contains a NUL character") from None
    except FileNotFoundError:
        raise UnusableFile(f"{path}: no such file") from None
    except NotADirectoryError:
        raise UnusableFile(f"{path}: a part of the path is a file, not a directory") from None
    except OSError as exc:
        raise UnusableFile(f"{path}: cannot be read ({exc.strerror or exc})") from None
    _check_regular(path, before, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnusableFile(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        _check_regular(path, os.fstat(fd), max_bytes)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UnusableFile(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if size > max_bytes:  # it grew after the size check
        raise UnusableFile(f"{path}: larger than {max_bytes} bytes, the most that is read")
    return b"".join(chunks)


def _check_regular(path: Path, info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnusableFile(f"{path}: is a {file_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise UnusableFile(
            f"{path}: is {info.st_size} bytes, larger than {max_bytes}, the most that is read"
        )


def output_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be (or become) a directory this process writes into, or None.

    Nothing is created: a missing directory is fine when its nearest existing ancestor is a
    writable directory.
    """
    text = os.fspath(path)
    if problem := _text_problem(text):
        return problem
    absolute = Path(os.path.abspath(text))
    try:
        existing, info = _nearest_existing(absolute)
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or exc})"
    if problem := _length_problem(absolute, existing):
        return problem
    if existing == absolute:
        if not stat.S_ISDIR(info.st_mode):
            return f"exists and is a {file_kind(info.st_mode)}, not a directory"
        if not os.access(absolute, os.W_OK | os.X_OK):
            return "is a directory this process cannot write to"
        return None
    return _ancestor_problem(existing, info)


def output_file_problem(text: str) -> str | None:
    """Why a file cannot be written (by renaming a new file over it) at `text`, or None.

    Refused: blank names, names ending in a separator, an existing directory, device, FIFO,
    socket or symbolic link (the rename would replace it: as root, /dev/null itself), a path
    under a file, and places this process cannot write to.
    """
    if problem := _text_problem(text):
        return problem
    name = os.path.basename(text)
    if text.endswith(os.sep) or name in ("", ".", ".."):
        return "names a directory, not a file"
    if name != name.strip():
        return f"the file name {name!r} starts or ends with blanks"
    absolute = Path(os.path.abspath(text))
    try:
        existing, info = _nearest_existing(absolute)
        own = os.lstat(absolute) if existing == absolute else None
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or exc})"
    if problem := _length_problem(absolute, existing):
        return problem
    if own is None:
        return _ancestor_problem(existing, info)
    if stat.S_ISDIR(own.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(own.st_mode):
        return f"exists and is a {file_kind(own.st_mode)}; only a regular file is replaced"
    if not os.access(absolute.parent, os.W_OK | os.X_OK):
        return f"cannot be replaced: {absolute.parent} is not writable"
    return None


def _text_problem(text: str) -> str | None:
    if not text.strip():
        return "is empty"
    if "\0" in text:
        return "contains a NUL character"
    return None


def _nearest_existing(path: Path) -> tuple[Path, os.stat_result]:
    """The path itself or its closest ancestor that exists, with its stat (links followed)."""
    for candidate in (path, *path.parents):
        try:
            return candidate, os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:  # too long: said by _length_problem
                raise
    raise FileNotFoundError(f"no ancestor of {path} exists")


def _ancestor_problem(existing: Path, info: os.stat_result) -> str | None:
    if not stat.S_ISDIR(info.st_mode):
        return f"is under {existing}, which is a {file_kind(info.st_mode)}, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be created: {existing} is a directory this process cannot write to"
    return None


def _length_problem(absolute: Path, existing: Path) -> str | None:
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = _DEFAULT_NAME_MAX, _DEFAULT_PATH_MAX
    length = len(os.fsencode(absolute))
    if length >= path_max:
        return f"is {length} bytes long as an absolute path; the limit here is {path_max - 1}"
    for part in absolute.parts:
        if len(os.fsencode(part)) > name_max:
            return (
                f"has a name of {len(os.fsencode(part))} bytes ({part[:16]!r}...); "
                f"the file system allows {name_max}"
            )
    return None
