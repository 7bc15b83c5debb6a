"""Bounds on the numbers users give the plugin, and the strict parsers that enforce them.

Python's int() and float() accept far more than a user means: full-width and other Unicode
digits, underscores, signs, blanks, "inf", "nan", "1e300" and numbers of thousands of digits
(which int() refuses with a ValueError that names no file or option). Every number the plugin
reads from an option or a config file is plain ASCII decimal, checked against its bound
before anything is built from it.
"""

from __future__ import annotations

import re

# A pool starts this many processes on one host, and a torchrun job's groups are as large as
# its nodes: tensor parallelism spans at most a rack (72 GPUs of an NVL72), so 1024 is past any
# real group while still a process count a host can hold.
MAX_WORLD_SIZE = 1024
# The widest models served today have hidden sizes of 16384 to 25600; 131072 leaves room for
# wider ones while one row of float32 stays at 512 KiB.
MAX_HIDDEN_SIZE = 1 << 17
# Rows of one allreduce: a server's step holds at most its max batch tokens (prefill chunks
# of 8k to 64k tokens); a million rows is 16 times the largest chunk servers configure.
MAX_BATCH_SIZE = 1 << 20
# Values of one list option: each value is a test per backend and suite (and a latency
# measurement on the GPU); 4096 is already days of device time, so more is a typo such as
# a range without its step. Counted before a range is expanded.
MAX_LIST_VALUES = 4096
# Config file keys are batch sizes a server compares with its int32 token count.
MAX_CONFIG_KEY = 2**31 - 1
# Below a second, ordinary scheduling noise on a loaded host ends healthy calls; above a day
# a call is stuck, not slow (and the in-rank waits, which must be longer, stay representable).
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 86400.0

_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)


def parse_count(text: str, high: int) -> int:
    """`text` as an integer 1..high, written in plain ASCII digits; ValueError says why.

    The digit count is checked before int() runs, so a 5000-digit value costs nothing and
    fails with this message rather than int()'s.
    """
    if not _DIGITS.fullmatch(text):
        raise ValueError(
            f"{_shown(text)} is not an integer (plain digits 0-9; a positive integer up to {high})"
        )
    significant = text.lstrip("0") or "0"
    if len(significant) > len(str(high)) or int(significant) > high:
        raise ValueError(f"{_shown(text)} is above the largest allowed value, {high}")
    value = int(significant)
    if value < 1:
        raise ValueError(f"{value} must be a positive integer")
    return value


def parse_seconds(text: str) -> float:
    """A timeout in seconds: plain decimal, MIN_TIMEOUT_S..MAX_TIMEOUT_S; ValueError says why."""
    allowed = f"a positive number of seconds from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}"
    if not _DECIMAL.fullmatch(text.strip()) or len(text.strip()) > 32:
        raise ValueError(f"{_shown(text)} is not {allowed} (plain decimal, like 90 or 2.5)")
    value = float(text)
    if not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
        raise ValueError(f"{value:g} is not {allowed}")
    return value


def _shown(text: str) -> str:
    """`text` quoted, cut short when long (a 5000-digit value is not repeated in full)."""
    if len(text) <= 24:
        return repr(text)
    return f"{text[:12]!r}... ({len(text)} characters)"
