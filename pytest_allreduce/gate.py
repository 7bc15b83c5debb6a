"""The latency baseline gate: fail CI when a backend got slower beyond noise.

Why a two-part rule: a plain ratio threshold on single numbers either fires on every noisy
run or must be so wide that it misses real regressions (a FlashInfer upgrade that made the
fused kernel far slower on one GPU went unnoticed that way). So, per key:

    A measured key (backend, world size, hidden, dtype, batch size, job) present in the
    baseline regresses when ALL of
      - its median is more than REGRESSION_THRESHOLD (10%) above the baseline median,
      - its median is more than REGRESSION_FLOOR_US (1.5 us) above the baseline median, and
      - a one-sided Mann-Whitney U test (current samples greater than baseline samples)
        gives p < P_VALUE_MAX (0.01).

The thresholds say the change matters; the test says it is not noise within the run. The
absolute floor covers what the test cannot see: drift between runs. Samples of one run come
from one capture in one process and agree closely, but two runs a minute apart on 2 x H200
differed by up to 20% (1.1 us) at ops of 3-7 us (docs/results/h200x2-suites.md), which the
test alone reads as significant. Keys present on only
one side are reported as notes, never failures (a backend newly skipped or newly added
should be seen, but it is not a slowdown). A baseline from another device, or one that lacks
a world size this session measured, is refused with `BaselineError`: comparing an H100 to an
H200, or TP2 to TP8, would gate on nonsense.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import stats
from .artifacts.atomic import atomic_write, dumps_json
from .config import device_label
from .fingerprint import device_name
from .model import JOBS
from .paths import UnusableFile, read_regular_file
from .results import ResultStore

# Raw samples of every measured key: megabytes for a full tuning grid; far more is not a
# baseline, and a device node must not be read without bound.
MAX_BASELINE_BYTES = 256 << 20
BASELINE_FORMAT = "pytest-allreduce-baseline"
BASELINE_VERSION = 1
# A key regresses only when its median is more than this fraction above the baseline's...
REGRESSION_THRESHOLD: float = 0.10
# ...and more than this many microseconds above it (run-to-run drift of microsecond ops)...
REGRESSION_FLOOR_US: float = 1.5
# ...and the one-sided Mann-Whitney test (current slower) is significant (stats.P_VALUE_MAX).

# (backend, world size, hidden, dtype, batch size, job)
BaselineKey = tuple[str, int, int, str, int, str]
_KEY_FIELDS: tuple[tuple[str, type], ...] = (
    ("backend", str),
    ("world_size", int),
    ("hidden", int),
    ("dtype", str),
    ("batch_size", int),
    ("job", str),
)


class BaselineError(ValueError):
    """A baseline that cannot be used: unreadable, malformed, or from another machine kind."""


def _key_label(key: BaselineKey) -> str:
    backend, ws, hidden, dtype, bs, job = key
    return f"{backend} tp{ws} hidden={hidden} {dtype} bs={bs} {job}"


@dataclass(frozen=True)
class Regression:
    """One key slower than its baseline beyond the rule."""

    key: BaselineKey
    baseline_median_us: float
    current_median_us: float
    change: float  # current / baseline - 1
    p_value: float

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        return (
            f"{_key_label(self.key)}: median {self.current_median_us:.2f} us vs baseline "
            f"{self.baseline_median_us:.2f} us ({self.change:+.1%}, p={self.p_value:.2g})"
        )


@dataclass
class GateReport:
    """What the gate found: regressions fail the session, notes are shown."""

    baseline: Path
    regressions: list[Regression] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compared: int = 0

    @property
    def passed(self) -> bool:
        return not self.regressions

    def summary(self) -> str:
        head = (
            f"latency gate against {self.baseline}: {self.compared} key(s) compared, "
            f"{len(self.regressions)} regression(s) (rule: median more than "
            f"{REGRESSION_THRESHOLD:.0%} and {REGRESSION_FLOOR_US} us slower and one-sided "
            f"Mann-Whitney p < {stats.P_VALUE_MAX})"
        )
        lines = [head]
        lines += [f"  REGRESSION {r.describe()}" for r in self.regressions]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _current_device_name(store: ResultStore) -> str:
    if store.device == "cpu":
        return "cpu"
    return device_label(device_name(store.machine))


def _current_entries(store: ResultStore) -> dict[BaselineKey, list[float]]:
    entries: dict[BaselineKey, list[float]] = {}
    for (case, job), lat in store.latencies.items():
        if not lat.samples_us:
            continue
        t = case.target
        key = (t.backend, t.world_size, t.hidden, t.dtype, case.batch_size, job)
        entries[key] = [float(s) for s in lat.samples_us]
    return entries


def save_baseline(store: ResultStore, path: str | os.PathLike[str]) -> Path:
    """Write this session's latencies (medians and raw samples) as a baseline, atomically."""
    entries = _current_entries(store)
    doc = {
        "format": BASELINE_FORMAT,
        "format_version": BASELINE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(),
        "device": store.device,
        "device_name": _current_device_name(store),
        "world_sizes": sorted({k[1] for k in entries}),
        "machine": store.machine,
        "entries": [
            {
                **{name: value for (name, _), value in zip(_KEY_FIELDS, key, strict=True)},
                "median_us": stats.median(samples),
                "samples_us": samples,
            }
            for key, samples in sorted(entries.items())
        ],
    }
    return atomic_write(Path(path), dumps_json(doc))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_baseline(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[BaselineKey, list[float]]]:
    """(header, samples per key) of a baseline file; BaselineError naming file and problem."""
    path = Path(path)

    def bad(problem: str) -> BaselineError:
        return BaselineError(f"baseline {path}: {problem}")

    try:
        text = read_regular_file(path, MAX_BASELINE_BYTES).decode("utf-8")
    except UnusableFile as exc:
        raise BaselineError(f"baseline {exc}") from None
    except UnicodeDecodeError as exc:
        raise bad(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise bad("the top level must be a JSON object")
    if doc.get("format") != BASELINE_FORMAT:
        raise bad(f"'format' is {doc.get('format')!r}, expected {BASELINE_FORMAT!r}")
    if doc.get("format_version") != BASELINE_VERSION:
        raise bad(
            f"'format_version' is {doc.get('format_version')!r}; this version reads "
            f"{BASELINE_VERSION}"
        )
    for name in ("device", "device_name"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise bad(f"{name!r} must be a non-empty string")
    world_sizes = doc.get("world_sizes")
    if not isinstance(world_sizes, list) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in world_sizes
    ):
        raise bad("'world_sizes' must be a list of positive integers")
    raw = doc.get("entries")
    if not isinstance(raw, list):
        raise bad("'entries' must be a list")
    entries: dict[BaselineKey, list[float]] = {}
    for i, entry in enumerate(raw):
        where = f"entries[{i}]"
        if not isinstance(entry, dict):
            raise bad(f"{where} must be an object")
        parts = []
        for name, kind in _KEY_FIELDS:
            value = entry.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise bad(f"{where}.{name} must be a {kind.__name__}, got {value!r}")
            parts.append(value)
        key: BaselineKey = tuple(parts)  # type: ignore[assignment]
        if key[5] not in JOBS:
            raise bad(f"{where}.job must be one of {', '.join(JOBS)}, got {key[5]!r}")
        samples = entry.get("samples_us")
        if not isinstance(samples, list) or not samples or not all(map(_number, samples)):
            raise bad(f"{where}.samples_us must be a non-empty list of finite numbers")
        if key in entries:
            raise bad(f"{where} repeats {_key_label(key)}")
        entries[key] = [float(s) for s in samples]
    header = {k: v for k, v in doc.items() if k != "entries"}
    return header, entries


def _check_compatible(
    path: Path, header: Mapping[str, Any], store: ResultStore, current_ws: set[int]
) -> None:
    ours = _current_device_name(store)
    theirs = header["device_name"]
    if theirs != ours or header["device"] != store.device:
        raise BaselineError(
            f"baseline {path} was recorded on device {theirs} ({header['device']}), this "
            f"session runs on {ours} ({store.device}); latencies are not comparable across "
            "devices: record a baseline for this device with --allreduce-save-baseline"
        )
    baseline_ws = set(header["world_sizes"])
    extra = current_ws - baseline_ws
    if extra:
        raise BaselineError(
            f"baseline {path} covers world size(s) "
            f"{', '.join(map(str, sorted(baseline_ws))) or 'none'}, this session measured "
            f"world size(s) {', '.join(map(str, sorted(current_ws)))}: "
            f"{', '.join(map(str, sorted(extra)))} cannot be gated against it"
        )


def check_baseline(store: ResultStore, path: str | os.PathLike[str]) -> GateReport:
    """Compare this session's latencies with a baseline by the rule in the module docstring."""
    path = Path(path)
    header, baseline = load_baseline(path)
    current = _current_entries(store)
    _check_compatible(path, header, store, {k[1] for k in current})
    report = GateReport(baseline=path)
    for key in sorted(set(current) | set(baseline)):
        if key not in baseline:
            report.notes.append(f"{_key_label(key)}: measured now, not in the baseline")
            continue
        if key not in current:
            report.notes.append(f"{_key_label(key)}: in the baseline, not measured now")
            continue
        now, then = current[key], baseline[key]
        now_med, then_med = stats.median(now), stats.median(then)
        report.compared += 1
        change = now_med / then_med - 1.0 if then_med > 0 else 0.0
        if change <= REGRESSION_THRESHOLD or now_med - then_med <= REGRESSION_FLOOR_US:
            continue
        p_value = stats.mann_whitney_p(now, then, "greater")
        if stats.significant(p_value):
            report.regressions.append(Regression(key, then_med, now_med, change, p_value))
        else:
            report.notes.append(
                f"{_key_label(key)}: median {change:+.1%} but within noise (p={p_value:.2g})"
            )
    return report
