"""The one way this plugin writes a file: whole or not at all.

A server may start while a tuning run writes its config, and a run may be killed at any
moment, so every artifact goes to a temporary file in the target's directory, is flushed
and fsynced, renamed over the target (atomic within one file system on POSIX) and the
directory entry is fsynced too: a reader, or a crash, sees the old file or the new one,
never half of one, and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..outputdir import temp_file_prefix

# Temporary files carry the writer's pid (outputdir.temp_file_prefix), so a later session
# can remove a killed writer's leftovers and leave a live one's alone.
TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` to `path` atomically; keeps an existing file's permissions (new files
    get 0644, since artifacts are meant to be shared, where mkstemp would give 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(
        prefix=temp_file_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def dumps_json(obj: Any) -> str:
    """JSON text for artifacts: indented, and never failing on an odd value (str() it)."""
    return json.dumps(obj, indent=2, default=str) + "\n"
