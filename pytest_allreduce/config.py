"""The server config file: the one place that writes it, loads it and answers lookups.

This module is the schema: it imports no torch, so tools and servers can validate and look
up a config cheaply. Writing goes through `pytest_allreduce.artifacts.config`; running a
config without SGLang's loader is `pytest_allreduce.runtime.AdaptiveAllReduce` (also
importable from here).

The tuner's output is only useful if a server can read it, so this module treats the
consumer's reader (SGLang's adaptive allreduce, see `consumer.py`) as the specification:

* a JSON object keyed by batch sizes written as decimal strings, in ascending numeric order;
* each value has exactly ``backend_type``, ``use_residual_rmsnorm_fusion`` and
  ``backend_name`` (the consumer builds its entry with ``cls(**value)``: an extra field makes
  it raise at server start-up, far from the tuner that wrote it, and a missing one silently
  takes a default);
* at run time the key nearest to the batch size wins, a tie goes to the key that comes first
  in the file (the smaller one, since keys ascend), and a batch size beyond either end of the
  grid gets the end key.

Writing and loading share one validator, so any file the plugin writes loads, and
:func:`load_config` refuses a file the consumer would misread, or that the writer could never
have written, instead of guessing.

Validation rules (both directions):

* Keys are canonical positive decimal integers: ASCII digits only, no sign, no leading zero,
  no whitespace, no exponent (``"8"`` is accepted; ``"08"``, ``" 8"``, ``"+8"``, ``"8.0"``,
  ``"1e3"``, ``"0"``, ``"-1"`` are not). A non-canonical key may parse to an integer in one
  reader and fail in another, and two spellings of one batch size could both appear, so the
  only spelling accepted is the one ``str(int)`` produces.
* A key may appear only once (JSON allows duplicates; the consumer would silently keep the
  last one).
* Keys ascend: the consumer breaks a tie between two equally near keys by file order, so
  only an ascending file means "ties go to the smaller key", the rule :meth:`lookup` answers.
* ``backend_type`` is a GPU type (:data:`GPU_CONFIG_TYPES`) or a CPU type
  (:data:`CPU_CONFIG_TYPES`), never both kinds in one file; the file's kind is reported as
  :attr:`AllreduceConfig.device`.
* ``use_residual_rmsnorm_fusion`` is a JSON boolean (not 0/1) and may be true only with
  ``backend_type`` ``"flashinfer_fusion"``, the only fused type the consumer knows; on a CPU
  config it is therefore always false.
* ``backend_name`` is a non-empty string with no surrounding whitespace. On load, each entry
  (type and fusion flag) must be one the consumer profile writes, and its ``backend_name`` a
  variant that consumer can run for that entry (`serving.runnable_variants`) and that this
  installation has: the same model decides what the writer emits, so what loads is exactly
  what the writer can write.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend import CPU_CONFIG_TYPES, GPU_CONFIG_TYPES
from .bounds import MAX_CONFIG_KEY, parse_count
from .paths import UnusableFile, read_regular_file

if TYPE_CHECKING:
    from .registry import BackendRegistry

__all__ = [
    "CONFIG_FIELDS",
    "FUSED_CONFIG_TYPE",
    "AllreduceConfig",
    "ConfigEntry",
    "ConfigError",
    "config_path",
    "config_paths",
    "config_types",
    "default_registry",
    "device_kind",
    "device_label",
    "load_config",
]

# The exact field set of one value, in the order the writer emits them.
CONFIG_FIELDS: tuple[str, ...] = ("backend_type", "use_residual_rmsnorm_fusion", "backend_name")
# The only backend type whose entries may ask the server for the fused residual add + RMSNorm.
FUSED_CONFIG_TYPE = "flashinfer_fusion"
_ALL_TYPES = GPU_CONFIG_TYPES | CPU_CONFIG_TYPES
# A config is a few kilobytes; a file far larger is not one (and /dev/zero must not be read
# until memory runs out).
MAX_CONFIG_BYTES = 16 << 20
# What str(int) produces for a positive int; re.ASCII keeps non-ASCII digits out.
_CANONICAL_KEY = re.compile(r"[1-9][0-9]*", re.ASCII)


class ConfigError(ValueError):
    """A config that cannot be written or loaded; the message names the file and the problem."""


def device_kind(device: object) -> str:
    """'cuda' or 'cpu' for a device spec: 'cuda', 'cuda:1', 'cpu' or a torch.device."""
    kind = str(getattr(device, "type", device)).split(":", 1)[0].strip()
    if kind not in ("cuda", "cpu"):
        raise ConfigError(f"device {device!r}: server configs exist for 'cuda' and 'cpu' only")
    return kind


def config_types(kind: str) -> frozenset[str]:
    return GPU_CONFIG_TYPES if kind == "cuda" else CPU_CONFIG_TYPES


# ---- file naming ---------------------------------------------------------------------------


def device_label(device_name: str) -> str:
    """The DEV part of every artifact name: the device name with spaces as underscores.

    `device_name` is ``torch.cuda.get_device_name()`` on a GPU, ``"cpu"`` on the CPU. The
    consumer looks its file up by the name of the GPU it runs on, so the label must be
    derived exactly as it derives it. The one place this rule lives.
    """
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"device name must be a non-empty string, got {device_name!r}")
    label = device_name.strip().replace(" ", "_")
    if "/" in label or "\\" in label or label in (".", ".."):
        raise ValueError(f"device name {device_name!r} cannot be part of a file name")
    return label


def config_path(
    output_dir: str | os.PathLike[str], world_size: int, hidden: int, device_name: str
) -> Path:
    """`output_dir/tp{N}/allreduce_config_hidden={H},device={DEV}.json`.

    `device_name` is the raw device name (``torch.cuda.get_device_name()`` or ``"cpu"``);
    spaces become underscores here so callers cannot forget it. The tensor-parallel size is
    a directory rather than part of the name because the consumer's name has no TP field, and
    TP2 and TP8 tunings of one model would otherwise overwrite each other.
    """
    for label, value in (("world_size", world_size), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    name = f"allreduce_config_hidden={hidden},device={device_label(device_name)}.json"
    return Path(output_dir) / f"tp{world_size}" / name


def config_paths(
    output_dir: str | os.PathLike[str],
    world_size: int,
    hidden: int,
    device_name: str,
    device: object,
    *,
    partial: bool = False,
) -> tuple[Path, ...]:
    """Every file name the consumer's generations read, under `output_dir/tp{N}/`.

    On CUDA: `allreduce_config_hidden={H},device={DEV}.json` (SGLang's adaptive allreduce,
    first generation) and `allreduce_config_hidden={H},tp={N},device={DEV}.json` (the later
    one); on the CPU the first name only. With `partial`, `.partial.json` instead of `.json`:
    a file no consumer looks for, written beside a complete config instead of over it.
    """
    from .consumer import profile_for

    first = config_path(output_dir, world_size, hidden, device_name)
    files = profile_for(device_kind(device)).config_files(hidden, world_size, device_name)
    suffix = ".partial.json" if partial else ".json"
    return tuple(first.parent / (f.name.removesuffix(".json") + suffix) for f in files)


# ---- the data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigEntry:
    """What the server runs for one batch size of the grid.

    Validated on construction, so a config built in code obeys the same rules as one read
    from a file (a bad entry fails where it is made, not when the server starts).
    """

    backend_type: str
    use_residual_rmsnorm_fusion: bool
    backend_name: str

    def __post_init__(self) -> None:
        if not isinstance(self.backend_type, str):
            raise ConfigError(
                f"backend_type must be a string, got {type(self.backend_type).__name__}"
            )
        if self.backend_type not in _ALL_TYPES:
            raise ConfigError(
                f"unknown backend_type {self.backend_type!r} (GPU types: "
                f"{', '.join(sorted(GPU_CONFIG_TYPES))}; CPU types: "
                f"{', '.join(sorted(CPU_CONFIG_TYPES))})"
            )
        if type(self.use_residual_rmsnorm_fusion) is not bool:
            raise ConfigError(
                "use_residual_rmsnorm_fusion must be true or false, got "
                f"{self.use_residual_rmsnorm_fusion!r}"
            )
        if self.use_residual_rmsnorm_fusion and self.backend_type != FUSED_CONFIG_TYPE:
            raise ConfigError(
                f"use_residual_rmsnorm_fusion is true with backend_type "
                f"{self.backend_type!r}; only {FUSED_CONFIG_TYPE!r} may fuse"
            )
        if not isinstance(self.backend_name, str):
            raise ConfigError(
                f"backend_name must be a string, got {type(self.backend_name).__name__}"
            )
        if not self.backend_name or self.backend_name != self.backend_name.strip():
            raise ConfigError(
                f"backend_name must be non-empty with no surrounding whitespace, "
                f"got {self.backend_name!r}"
            )

    @property
    def device(self) -> str:
        """'cuda' for a GPU type, 'cpu' for a CPU type (the two sets are disjoint)."""
        return "cuda" if self.backend_type in GPU_CONFIG_TYPES else "cpu"

    def as_json(self) -> dict[str, Any]:
        """The value as the file holds it: exactly CONFIG_FIELDS, in that order."""
        return {field: getattr(self, field) for field in CONFIG_FIELDS}


def _check_key(key: Any) -> int:
    """`key` as a batch size: a positive int, bools refused (True is not a batch size)."""
    if isinstance(key, bool):
        raise ConfigError(f"batch size must be a positive int, got {key!r}")
    try:
        value = operator.index(key)
    except TypeError:
        raise ConfigError(
            f"batch size must be a positive int, got {type(key).__name__} {key!r}"
        ) from None
    if value < 1:
        raise ConfigError(f"batch size must be a positive int, got {value}")
    return value


class AllreduceConfig(Mapping[int, ConfigEntry]):
    """An immutable, validated mapping batch size -> :class:`ConfigEntry`.

    Keys are kept sorted so :meth:`lookup` is a binary search; `device` says whether the
    entries are GPU ('cuda') or CPU ('cpu') backend types, which is never mixed.
    """

    __slots__ = ("_device", "_entries", "_keys")

    def __init__(self, entries: Mapping[int, ConfigEntry]) -> None:
        if not isinstance(entries, Mapping):
            raise ConfigError(f"a config is a mapping, got {type(entries).__name__}")
        if not entries:
            raise ConfigError("a config needs at least one batch size")
        checked: dict[int, ConfigEntry] = {}
        for key, entry in entries.items():
            size = _check_key(key)
            if size in checked:
                raise ConfigError(f"batch size {size} appears twice")
            if not isinstance(entry, ConfigEntry):
                raise ConfigError(
                    f"batch size {size}: entry must be a ConfigEntry, got {type(entry).__name__}"
                )
            checked[size] = entry
        devices = {entry.device: size for size, entry in checked.items()}
        if len(devices) > 1:
            raise ConfigError(
                f"mixes GPU and CPU backend types (GPU at batch size {devices['cuda']}, "
                f"CPU at batch size {devices['cpu']})"
            )
        self._keys: tuple[int, ...] = tuple(sorted(checked))
        self._entries: dict[int, ConfigEntry] = {k: checked[k] for k in self._keys}
        self._device: str = next(iter(devices))

    # Mapping protocol -------------------------------------------------------------------

    def __getitem__(self, batch_size: int) -> ConfigEntry:
        return self._entries[batch_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AllreduceConfig):
            return self._entries == other._entries
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._entries.items()))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {e.backend_name}" for k, e in self._entries.items())
        return f"AllreduceConfig({self._device}; {body})"

    # ---------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """'cuda' for a GPU config, 'cpu' for a CPU config."""
        return self._device

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The grid, ascending."""
        return self._keys

    def lookup_key(self, batch_size: int) -> int:
        """The grid key the consumer uses for `batch_size`.

        The nearest key by absolute distance; a tie goes to the smaller key (the first in
        the ascending file, as the consumer breaks ties); beyond the largest key the largest,
        below the smallest the smallest. O(log n).
        """
        try:
            rows = _check_key(batch_size)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        keys = self._keys
        i = bisect.bisect_left(keys, rows)
        if i == len(keys):
            return keys[-1]
        if i == 0 or keys[i] == rows:
            return keys[i]
        below, above = keys[i - 1], keys[i]
        return below if rows - below <= above - rows else above

    def lookup(self, batch_size: int) -> ConfigEntry:
        """The entry the consumer runs at `batch_size` (see :meth:`lookup_key`)."""
        return self._entries[self.lookup_key(batch_size)]

    def as_json(self) -> dict[str, dict[str, Any]]:
        """The JSON object: keys as decimal strings in ascending numeric order."""
        return {str(k): e.as_json() for k, e in self._entries.items()}

    def dumps(self) -> str:
        """The file's text. Never sort_keys: that would put "10" before "2"."""
        return json.dumps(self.as_json(), indent=2) + "\n"


# ---- loading -------------------------------------------------------------------------------


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _from_json(obj: Any, source: str) -> AllreduceConfig:
    """Validate a parsed JSON value completely, then build the config (never half of it)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object, got {_json_kind(obj)}")
    if not obj:
        raise ConfigError(f"{source}: the config is empty (no batch sizes)")
    entries: dict[int, ConfigEntry] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not _CANONICAL_KEY.fullmatch(key):
            raise ConfigError(
                f"{source}: key {key!r} is not a batch size (keys are positive integers "
                "written as plain decimal digits without sign, leading zeros or spaces)"
            )
        try:
            parse_count(key, MAX_CONFIG_KEY)
        except ValueError as exc:
            raise ConfigError(f"{source}: key {exc}") from None
        if entries and int(key) < max(entries):
            raise ConfigError(
                f"{source}: key {key} comes after {max(entries)}: keys must ascend, because "
                "the consumer gives a tie between two equally near keys to the one first in "
                "the file"
            )
        where = f"{source}: batch size {key}"
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: the value must be a JSON object, got {_json_kind(value)}")
        missing = [f for f in CONFIG_FIELDS if f not in value]
        extra = sorted(f for f in value if f not in CONFIG_FIELDS)
        if extra:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(map(repr, extra))} (the server builds "
                f"its entry from exactly {', '.join(CONFIG_FIELDS)} and would refuse the file)"
            )
        if missing:
            raise ConfigError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
        try:
            entries[int(key)] = ConfigEntry(**value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    try:
        return AllreduceConfig(entries)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def parse_config_text(text: str, source: str) -> AllreduceConfig:
    try:
        obj = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid JSON: nested too deeply") from None
    return _from_json(obj, source)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    expect_device: object | None = None,
    registry: BackendRegistry | None = None,
) -> AllreduceConfig:
    """Load and validate a server config; raise :class:`ConfigError` on any problem.

    `source` is a path (``os.PathLike``, or a ``str`` whose first non-blank character is
    not ``{`` or ``[``), JSON text (a ``str`` starting with ``{`` or ``[``), or an already
    parsed mapping. The error message starts with the file name (or ``<json text>``) and
    names the first problem found. Both GPU and CPU configs load; the result's ``device``
    says which. With `expect_device`, a config of the other kind is refused. Backend names
    are checked against `registry` (default: the built-in and entry-point backends).
    """
    if isinstance(source, Mapping):
        config = _from_json(dict(source), "<mapping>")
        where = "<mapping>"
    elif isinstance(source, str) and source.lstrip()[:1] in ("{", "["):
        config = parse_config_text(source, "<json text>")
        where = "<json text>"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        try:
            raw = read_regular_file(path, MAX_CONFIG_BYTES)
        except UnusableFile as exc:
            why = str(exc).removeprefix(f"{path}: ")
            raise ConfigError(f"{path}: cannot read the config: {why}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        config = parse_config_text(text, where)
    else:
        raise TypeError(
            f"load_config takes a path, JSON text or a mapping, got {type(source).__name__}"
        )
    if expect_device is not None and config.device != device_kind(expect_device):
        raise ConfigError(
            f"{where}: a {config.device.upper()} config (backend types "
            f"{', '.join(sorted({e.backend_type for e in config.values()}))}) where a "
            f"{device_kind(expect_device).upper()} config is expected"
        )
    check_backend_names(config, registry or default_registry(), where)
    return config


def check_backend_names(config: AllreduceConfig, registry: BackendRegistry, where: str) -> None:
    """Every entry is one the consumer profile writes, naming a variant of this installation
    that the consumer can run for it.

    The writer names the variant the profile says runs (selection.py), so what it writes
    passes, and a file it never would (the FP8-output fusion, a two-shot fusion, a one-shot
    symmetric-memory kernel) does not load.
    """
    from .consumer import Entry, profile_for
    from .serving import runnable_variants

    profile = profile_for(config.device)
    known = {v.name for v in registry.variants()}
    for size, value in config.items():
        if value.backend_name not in known:
            raise ConfigError(
                f"{where}: batch size {size}: backend_name {value.backend_name!r} is not a "
                f"backend of this installation (known: {', '.join(sorted(known))})"
            )
        entry = Entry(value.backend_type, value.use_residual_rmsnorm_fusion)
        pair = f"backend_type {entry.backend_type!r} with fusion {str(entry.fused).lower()}"
        if entry not in profile.entries:
            written = ", ".join(f"{e.backend_type}/{str(e.fused).lower()}" for e in profile.entries)
            raise ConfigError(
                f"{where}: batch size {size}: {pair} is not an entry {profile.name} configs "
                f"hold (type/fusion: {written}); its reader would run another entry's path"
            )
        runnable = runnable_variants(profile, entry)
        if value.backend_name not in runnable:
            raise ConfigError(
                f"{where}: batch size {size}: {profile.name} never runs "
                f"{value.backend_name!r} for {pair} (it runs one of "
                f"{', '.join(sorted(runnable))})"
            )


def default_registry() -> BackendRegistry:
    """The built-in backends plus those installed through entry points (no torch import)."""
    from .registry import BackendRegistry

    registry = BackendRegistry()
    registry.load_builtins()
    registry.load_entry_points()
    return registry


def __getattr__(name: str) -> Any:
    # The dispatcher needs torch; importing it lazily keeps the schema torch-free while
    # `from pytest_allreduce.config import AdaptiveAllReduce` keeps working.
    if name == "AdaptiveAllReduce":
        from .runtime import AdaptiveAllReduce

        return AdaptiveAllReduce
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
