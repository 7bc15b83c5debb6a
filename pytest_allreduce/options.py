"""The plugin's options: declared once, parsed and validated once at start-up.

Every option is also an ini key (the option name without the leading dashes, `_` for `-`).
The command line wins over the ini file, which wins over the default. A bad value is a
pytest usage error (exit status 4) naming the option and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("float32", "float16", "bfloat16")
# SGLang's tuner default: [1, 2] + range(32, 512, 8).
DEFAULT_BATCH_SIZES = "1,2,32:504:8"
# Servers chunk prefill (SGLang's chunked-prefill size is 8192 or 16384 tokens by default), so
# no forward carries more tokens than that; the bound keeps a typo from planning set-ups of
# gigabytes per rank (65536 rows of hidden 8192 in bfloat16 are already 1 GiB).
MAX_TOKENS_LIMIT = 65536
DEFAULT_MAX_TOKENS = 8192


@dataclass(frozen=True)
class OptionSpec:
    name: str  # without leading dashes
    default: str | None
    help: str

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def ini(self) -> str:
        return self.name.replace("-", "_")

    @property
    def dest(self) -> str:
        return self.ini


OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "allreduce-backends",
        "all",
        "comma list of backend names or variant names, or 'all' (default: all)",
    ),
    OptionSpec(
        "allreduce-device",
        "auto",
        "auto|cuda|cpu: cuda when GPUs are visible, else cpu (default: auto)",
    ),
    OptionSpec("allreduce-world-sizes", "2", "ranks per process group, comma list (default: 2)"),
    OptionSpec("allreduce-hidden-sizes", "4096", "hidden dimensions, comma list (default: 4096)"),
    OptionSpec(
        "allreduce-batch-sizes",
        DEFAULT_BATCH_SIZES,
        "rows per allreduce, comma list; 'a:b:step' is a range including b when the step "
        f"lands on it (default: {DEFAULT_BATCH_SIZES})",
    ),
    OptionSpec(
        "allreduce-dtypes", "bfloat16", "float32, float16, bfloat16, comma list (default: bfloat16)"
    ),
    OptionSpec(
        "allreduce-output-dir",
        "allreduce-results",
        "where artifacts go (default: allreduce-results)",
    ),
    OptionSpec(
        "allreduce-timeout", "120", "bound in seconds on any one distributed call (default: 120)"
    ),
    OptionSpec(
        "allreduce-max-tokens",
        str(DEFAULT_MAX_TOKENS),
        "largest token count the config must cover, prefill included: the plan gets a "
        f"geometric tail up to it (1..{MAX_TOKENS_LIMIT}, default: {DEFAULT_MAX_TOKENS})",
    ),
    OptionSpec("allreduce-baseline", None, "gate latency against this baseline file"),
    OptionSpec("allreduce-save-baseline", None, "write this session's latencies as a baseline"),
)


@dataclass(frozen=True)
class Options:
    backends: tuple[str, ...]
    device: str
    world_sizes: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    output_dir: Path
    timeout_s: float
    baseline: Path | None
    save_baseline: Path | None
    max_tokens: int = DEFAULT_MAX_TOKENS  # defaulted so callers that predate it still work


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("allreduce", "allreduce backends (pytest-allreduce)")
    for spec in OPTION_SPECS:
        group.addoption(spec.flag, dest=spec.dest, default=None, metavar="VALUE", help=spec.help)
        parser.addini(spec.ini, help=spec.help, default=None)


def raw_values(config: pytest.Config) -> dict[str, tuple[str, str | None]]:
    """Each option's raw text and where it came from ('--flag' or 'ini key')."""
    values: dict[str, tuple[str, str | None]] = {}
    for spec in OPTION_SPECS:
        cli = config.getoption(spec.dest)
        if cli is not None:
            values[spec.name] = (spec.flag, cli)
            continue
        ini = config.getini(spec.ini)
        if ini not in (None, "", []):
            text = " ".join(ini) if isinstance(ini, list) else str(ini)
            values[spec.name] = (f"ini key {spec.ini}", text)
        else:
            values[spec.name] = (spec.flag, spec.default)
    return values


def parse_options(config: pytest.Config) -> Options:
    """Parse and validate every option; raises pytest.UsageError on the first bad one."""
    raw = raw_values(config)

    def get(name: str, parse: Callable[[str], T]) -> T:
        source, text = raw[name]
        try:
            return parse(text)  # type: ignore[arg-type]
        except ValueError as exc:
            raise pytest.UsageError(f"{source}={text!r}: {exc}") from None

    def optional_path(name: str) -> Path | None:
        text = raw[name][1]
        return None if text in (None, "") else Path(text)

    baseline = optional_path("allreduce-baseline")
    if baseline is not None and not baseline.is_file():
        source = raw["allreduce-baseline"][0]
        raise pytest.UsageError(f"{source}={str(baseline)!r}: no such baseline file")

    return Options(
        backends=get("allreduce-backends", parse_backend_list),
        device=get("allreduce-device", lambda t: parse_choice(t, DEVICES)),
        world_sizes=get("allreduce-world-sizes", parse_int_list),
        hidden_sizes=get("allreduce-hidden-sizes", parse_int_list),
        batch_sizes=get("allreduce-batch-sizes", parse_int_list),
        dtypes=get("allreduce-dtypes", parse_dtype_list),
        output_dir=Path(get("allreduce-output-dir", parse_nonempty)),
        timeout_s=get("allreduce-timeout", parse_timeout),
        baseline=baseline,
        save_baseline=optional_path("allreduce-save-baseline"),
        max_tokens=get("allreduce-max-tokens", parse_max_tokens),
    )


# ---- value parsers (ValueError messages say what is allowed) -------------------------------


def _items(text: str) -> list[str]:
    items = [item.strip() for item in text.replace(" ", ",").split(",") if item.strip()]
    if not items:
        raise ValueError("empty list")
    return items


def parse_nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def parse_choice(text: str, allowed: Sequence[str]) -> str:
    value = text.strip().lower()
    if value not in allowed:
        raise ValueError(f"allowed values: {', '.join(allowed)}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{value} must be a positive integer")
    return value


def parse_int_list(text: str) -> tuple[int, ...]:
    """'1,2,32:64:8' -> (1, 2, 32, 40, 48, 56, 64): sorted, without duplicates."""
    values: set[int] = set()
    for item in _items(text):
        if ":" in item:
            parts = item.split(":")
            if len(parts) not in (2, 3):
                raise ValueError(f"range {item!r} must be a:b or a:b:step")
            start, stop = _positive_int(parts[0]), _positive_int(parts[1])
            step = _positive_int(parts[2]) if len(parts) == 3 else 1
            if stop < start:
                raise ValueError(
                    f"range {item!r} ends before it starts; a range is a:b or a:b:step with a <= b"
                )
            values.update(range(start, stop + 1, step))
        else:
            values.add(_positive_int(item))
    return tuple(sorted(values))


def parse_dtype_list(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for item in _items(text):
        name = item.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {item!r}; allowed: {', '.join(DTYPES)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_backend_list(text: str) -> tuple[str, ...]:
    """Names are checked against the registry later, once every plugin has registered."""
    items = _items(text)
    if "all" in items and len(items) > 1:
        raise ValueError("'all' cannot be combined with other names")
    return tuple(dict.fromkeys(items))


def parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def parse_max_tokens(text: str) -> int:
    value = _positive_int(text.strip())
    if value > MAX_TOKENS_LIMIT:
        raise ValueError(f"{value} exceeds the largest allowed, {MAX_TOKENS_LIMIT}")
    return value


def describe(options: Options) -> dict[str, Any]:
    return {
        "backends": list(options.backends),
        "device": options.device,
        "world_sizes": list(options.world_sizes),
        "hidden_sizes": list(options.hidden_sizes),
        "batch_sizes": list(options.batch_sizes),
        "dtypes": list(options.dtypes),
        "timeout_s": options.timeout_s,
        "max_tokens": options.max_tokens,
    }
