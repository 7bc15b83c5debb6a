"""The server config file: the one place that writes it, loads it and answers lookups.

The tuner's output is only useful if a server can read it, so this module treats the
consumer's reader (SGLang's adaptive allreduce) as the specification:

* a JSON object keyed by batch sizes written as decimal strings, in ascending numeric order;
* each value has exactly ``backend_type``, ``use_residual_rmsnorm_fusion`` and
  ``backend_name`` (the consumer builds a dataclass with ``cls(**value)``, so any other field
  makes it raise at server start-up, far from the tuner that wrote it);
* at run time the key nearest to the batch size wins, a tie goes to the smaller key, and a
  batch size beyond either end of the grid gets the end key.

Writing and loading share one validator, so any file :func:`write_config` produces loads, and
:func:`load_config` refuses a file the consumer would misread instead of guessing.

Validation rules (both directions):

* Keys are canonical positive decimal integers: ASCII digits only, no sign, no leading zero,
  no whitespace, no exponent (``"8"`` is accepted; ``"08"``, ``" 8"``, ``"+8"``, ``"8.0"``,
  ``"1e3"``, ``"0"``, ``"-1"`` are not). A non-canonical key may parse to an integer in one
  reader and fail in another, and two spellings of one batch size could both appear, so the
  only spelling accepted is the one ``str(int)`` produces.
* A key may appear only once (JSON allows duplicates; the consumer would silently keep the
  last one).
* Keys need not be in ascending order on load: the lookup does not depend on it. The writer
  always emits them ascending.
* ``backend_type`` is a GPU type (:data:`GPU_CONFIG_TYPES`) or a CPU type
  (:data:`CPU_CONFIG_TYPES`), never both kinds in one file; the file's kind is reported as
  :attr:`AllreduceConfig.device`.
* ``use_residual_rmsnorm_fusion`` is a JSON boolean (not 0/1) and may be true only with
  ``backend_type`` ``"flashinfer_fusion"``, the only fused type the consumer knows; on a CPU
  config it is therefore always false.
* ``backend_name`` is a non-empty string with no surrounding whitespace.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import operator
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backend import CPU_CONFIG_TYPES, GPU_CONFIG_TYPES, Backend
from .context import RankContext
from .registry import BackendRegistry, Variant

__all__ = [
    "CONFIG_FIELDS",
    "FUSED_CONFIG_TYPE",
    "AdaptiveAllReduce",
    "AllreduceConfig",
    "ConfigEntry",
    "ConfigError",
    "composed_add_rms_norm",
    "config_path",
    "default_registry",
    "device_label",
    "load_config",
    "write_config",
]

# The exact field set of one value, in the order the writer emits them.
CONFIG_FIELDS: tuple[str, ...] = ("backend_type", "use_residual_rmsnorm_fusion", "backend_name")
# The only backend type whose entries may ask the server for the fused residual add + RMSNorm.
FUSED_CONFIG_TYPE = "flashinfer_fusion"
_ALL_TYPES = GPU_CONFIG_TYPES | CPU_CONFIG_TYPES
# What str(int) produces for a positive int; re.ASCII keeps non-ASCII digits out.
_CANONICAL_KEY = re.compile(r"[1-9][0-9]*", re.ASCII)


class ConfigError(ValueError):
    """A config that cannot be written or loaded; the message names the file and the problem."""


def _kind(device: str | torch.device) -> str:
    """'cuda' or 'cpu' for a device spec ('cuda:1' and torch.device('cuda') count as cuda)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device") from exc
    if kind not in ("cuda", "cpu"):
        raise ConfigError(f"device {device!r}: server configs exist for 'cuda' and 'cpu' only")
    return kind


def _types_for(kind: str) -> frozenset[str]:
    return GPU_CONFIG_TYPES if kind == "cuda" else CPU_CONFIG_TYPES


# ---- file naming ---------------------------------------------------------------------------


def device_label(device: str | torch.device) -> str:
    """The DEV part of the file name for `device`: the CUDA device name or 'cpu'.

    The consumer looks its file up by the name of the GPU it runs on, so the label must be
    derived exactly as it derives it (spaces become underscores).
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).replace(" ", "_")
    raise ConfigError(f"device {device!r}: server configs exist for 'cuda' and 'cpu' only")


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
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"device_name must be a non-empty string, got {device_name!r}")
    dev = device_name.strip().replace(" ", "_")
    if "/" in dev or "\\" in dev or dev in (".", ".."):
        raise ValueError(f"device_name {device_name!r} cannot be part of a file name")
    name = f"allreduce_config_hidden={hidden},device={dev}.json"
    return Path(output_dir) / f"tp{world_size}" / name


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

    def backend_names(self) -> list[str]:
        """The distinct backend variants the config names, sorted (the set-up order)."""
        return sorted({e.backend_name for e in self._entries.values()})

    def lookup_key(self, batch_size: int) -> int:
        """The grid key the consumer uses for `batch_size`.

        The nearest key by absolute distance; a tie goes to the smaller key; beyond the
        largest key the largest, below the smallest the smallest. O(log n).
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


def _parse_text(text: str, source: str) -> AllreduceConfig:
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
    expect_device: str | torch.device | None = None,
) -> AllreduceConfig:
    """Load and validate a server config; raise :class:`ConfigError` on any problem.

    `source` is a path (``os.PathLike``, or a ``str`` whose first non-blank character is
    not ``{`` or ``[``), JSON text (a ``str`` starting with ``{`` or ``[``), or an already
    parsed mapping. The error message starts with the file name (or ``<json text>``) and
    names the first problem found. Both GPU and CPU configs load; the result's ``device``
    says which. With `expect_device`, a config of the other kind is refused.
    """
    if isinstance(source, Mapping):
        config = _from_json(dict(source), "<mapping>")
        where = "<mapping>"
    elif isinstance(source, str) and source.lstrip()[:1] in ("{", "["):
        config = _parse_text(source, "<json text>")
        where = "<json text>"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        config = _parse_text(text, where)
    else:
        raise TypeError(
            f"load_config takes a path, JSON text or a mapping, got {type(source).__name__}"
        )
    if expect_device is not None and config.device != _kind(expect_device):
        raise ConfigError(
            f"{where}: a {config.device.upper()} config (backend types "
            f"{', '.join(sorted({e.backend_type for e in config.values()}))}) where a "
            f"{_kind(expect_device).upper()} config is expected"
        )
    return config


# ---- writing -------------------------------------------------------------------------------


def write_config(
    path: str | os.PathLike[str], config: AllreduceConfig, device: str | torch.device
) -> Path:
    """Validate `config` for `device` ('cuda' or 'cpu') and write it atomically to `path`.

    The text is validated by the loader itself before anything touches the disk, so what is
    written always loads. It goes to a temporary file in the same directory, is flushed and
    fsynced, then renamed over `path`: a reader (or a crash) sees the old file or the new
    one, never a half-written one, and a failed write leaves the old file as it was.
    """
    path = Path(path)
    if not isinstance(config, AllreduceConfig):
        raise TypeError(f"write_config takes an AllreduceConfig, got {type(config).__name__}")
    kind = _kind(device)
    text = config.dumps()
    _parse_text(text, str(path))  # the writer's output must pass the reader's rules
    allowed = _types_for(kind)
    bad = {k: e.backend_type for k, e in config.items() if e.backend_type not in allowed}
    if bad:
        shown = ", ".join(f"{k}: {t}" for k, t in bad.items())
        raise ConfigError(
            f"{path}: a {kind.upper()} config may only use backend types "
            f"{', '.join(sorted(allowed))}; got {shown}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
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


# ---- runtime dispatch ----------------------------------------------------------------------


def composed_add_rms_norm(
    x_sum: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out) for an already reduced `x_sum`, composed in torch.

    The sum and the normalisation run in float32 and are rounded once to the input dtype,
    as the fused kernels do, so a composed path and a fused one differ by rounding only.
    """
    total = x_sum.float() + residual.float()
    residual_out = total.to(x_sum.dtype)
    inv_rms = torch.rsqrt(total.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (total * inv_rms * weight.float()).to(x_sum.dtype)
    return out, residual_out


def default_registry() -> BackendRegistry:
    """The built-in backends plus those installed through entry points."""
    registry = BackendRegistry()
    registry.load_builtins()
    registry.load_entry_points()
    return registry


class AdaptiveAllReduce:
    """Runs a config in a server that does not have SGLang's loader.

    Construction is collective: every rank resolves the config's distinct backend names,
    agrees that every rank can run them, and sets them up in sorted name order, so all ranks
    enter each backend's set-up collectives together. A dispatch decision depends only on the
    input's row count, which is the same on every rank, so all ranks pick the same backend.
    """

    def __init__(
        self,
        ctx: RankContext,
        config: AllreduceConfig,
        hidden: int,
        dtype: torch.dtype,
        max_rows: int,
        registry: BackendRegistry | None = None,
    ) -> None:
        if not isinstance(config, AllreduceConfig):
            raise TypeError(f"config must be an AllreduceConfig, got {type(config).__name__}")
        if config.device != ctx.device.type:
            raise ConfigError(f"a {config.device.upper()} config cannot run on device {ctx.device}")
        self.ctx = ctx
        self.config = config
        self.hidden = hidden
        self.dtype = dtype
        self.max_rows = max_rows
        registry = default_registry() if registry is None else registry
        variants = self._resolve(config, registry)
        # Every decision below is agreed before any backend's set-up collective starts: a
        # rank that refused alone would leave the others waiting in set-up forever.
        local = {name: v.cls.probe(ctx, v.variant) for name, v in variants.items()}
        refusals = [
            f"{name} on rank {rank}: {reason}"
            for rank, answers in enumerate(ctx.all_gather_object(local))
            for name, reason in sorted(answers.items())
            if reason is not None
        ]
        if refusals:
            raise ConfigError(
                "the config names backends this group cannot run: " + "; ".join(refusals)
            )
        self._backends: dict[str, Backend] = {}
        try:
            for name in sorted(variants):
                v = variants[name]
                self._backends[name] = v.cls(ctx, v.variant, hidden, dtype, max_rows)
        except BaseException:
            # The backends already set up are dropped, not closed: close() is collective,
            # and after a failed set-up the other ranks may never reach it.
            self._backends.clear()
            raise
        self.unfused: list[str] = sorted(
            {
                e.backend_name
                for e in config.values()
                if e.use_residual_rmsnorm_fusion and not self._backends[e.backend_name].fused
            }
        )
        if self.unfused and ctx.rank == 0:
            warnings.warn(
                f"the config asks for fused residual add + RMSNorm with {', '.join(self.unfused)}, "
                "which does not fuse here; composing allreduce + add + RMSNorm instead",
                RuntimeWarning,
                stacklevel=2,
            )

    @staticmethod
    def _resolve(config: AllreduceConfig, registry: BackendRegistry) -> dict[str, Variant]:
        """Each backend_name -> its registered variant; local and deterministic on every rank."""
        by_name = {v.name: v for v in registry.variants()}
        unknown: dict[str, list[int]] = {}
        mismatched: list[str] = []
        found: dict[str, Variant] = {}
        for size, entry in config.items():
            variant = by_name.get(entry.backend_name)
            if variant is None:
                unknown.setdefault(entry.backend_name, []).append(size)
                continue
            if variant.cls.backend_type != entry.backend_type:
                mismatched.append(
                    f"batch size {size} says backend_type {entry.backend_type!r} for "
                    f"{entry.backend_name}, which is {variant.cls.backend_type!r} here"
                )
            found[entry.backend_name] = variant
        if unknown:
            listed = "; ".join(
                f"{name} (batch sizes {', '.join(map(str, sizes))})"
                for name, sizes in sorted(unknown.items())
            )
            raise ConfigError(
                f"the config names backend(s) this installation does not have: {listed}. "
                f"Available: {', '.join(sorted(by_name)) or 'none'}"
            )
        if mismatched:
            raise ConfigError("; ".join(mismatched))
        return found

    @property
    def backends(self) -> dict[str, Backend]:
        """The set-up backends by full variant name."""
        return dict(self._backends)

    def backend_for(self, rows: int) -> Backend:
        """The backend the config picks for an input of `rows` rows."""
        return self._backends[self.config.lookup(rows).backend_name]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the group, in a new tensor."""
        backend = self.backend_for(x.shape[0])
        out = torch.empty_like(x)
        backend.all_reduce(x, out)
        return out

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(allreduce(x) + residual) * weight, allreduce(x) + residual).

        Fused in one call where the entry asks for it and the backend fuses; otherwise the
        allreduce is followed by the add and the norm composed in torch.
        """
        entry = self.config.lookup(x.shape[0])
        backend = self._backends[entry.backend_name]
        if entry.use_residual_rmsnorm_fusion and backend.fused:
            out = torch.empty_like(x)
            residual_out = torch.empty_like(residual)
            backend.fused_add_rms_norm(x, residual, weight, eps, out, residual_out)
            return out, residual_out
        x_sum = torch.empty_like(x)
        backend.all_reduce(x, x_sum)
        return composed_add_rms_norm(x_sum, residual, weight, eps)

    def close(self) -> None:
        """Release every backend, in set-up order. Collective."""
        backends, self._backends = self._backends, {}
        for name in sorted(backends):
            backends[name].close()
