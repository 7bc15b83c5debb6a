"""The plugin's options: declared once, parsed and validated once at start-up.

Every option is also an ini key (the option name without the leading dashes, `_` for `-`).
The command line wins over the ini file, which wins over the default. A bad value is a
pytest usage error (exit status 4) naming the option and what is allowed, raised before
anything is written: numbers are bounded (bounds.py says why each bound), paths are checked
for what will be done with them (paths.py), and a baseline is read and validated in full.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from . import bounds
from .paths import UnusableFile, output_dir_problem, output_file_problem, read_regular_file

T = TypeVar("T")

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("float32", "float16", "bfloat16")
# SGLang's tuner default: [1, 2] + range(32, 512, 8).
DEFAULT_BATCH_SIZES = "1,2,32:504:8"
DEFAULT_TIMEOUT_S = 120.0
# Starting a pool imports torch in a fork server and rendezvouses every rank; on a loaded
# host (load average 4-12 on 2 cores) that took over 20 s, on a GPU host NCCL's set-up adds
# more. Start-up has its own bound so that a short call bound does not make it fail.
DEFAULT_STARTUP_TIMEOUT_S = 300.0
# A baseline of every backend, size, job and dtype with its raw samples is tens of MB; the
# bound stops a device or a huge file from being read into memory, never a real baseline.
MAX_BASELINE_BYTES = 256 << 20
DEFAULT_FEWSHOT = 5  # lm-eval's gsm8k task default
# GSM8K's train split has 7473 questions; more shots than this would not fit a context.
MAX_FEWSHOT = 32
# GSM8K's test split has 1319 questions; a larger limit would silently mean "all".
MAX_GSM8K_QUESTIONS = 1319
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
        "allreduce-timeout",
        f"{DEFAULT_TIMEOUT_S:g}",
        f"bound in seconds on any one distributed call (default: {DEFAULT_TIMEOUT_S:g})",
    ),
    OptionSpec(
        "allreduce-startup-timeout",
        f"{DEFAULT_STARTUP_TIMEOUT_S:g}",
        "bound in seconds on starting a process group's ranks "
        f"(default: {DEFAULT_STARTUP_TIMEOUT_S:g})",
    ),
    OptionSpec(
        "allreduce-max-tokens",
        str(DEFAULT_MAX_TOKENS),
        "largest token count the config must cover, prefill included: the plan gets a "
        f"geometric tail up to it (1..{MAX_TOKENS_LIMIT}, default: {DEFAULT_MAX_TOKENS})",
    ),
    OptionSpec("allreduce-baseline", None, "gate latency against this baseline file"),
    OptionSpec("allreduce-save-baseline", None, "write this session's latencies as a baseline"),
    OptionSpec(
        "allreduce-model",
        "tiny",
        "model of the accuracy suite: a Hugging Face directory, a .gguf file, or 'tiny' (a "
        "random-weight Qwen2 built in-process) (default: tiny)",
    ),
    OptionSpec(
        "allreduce-gsm8k-data",
        None,
        "directory with GSM8K's train.jsonl and test.jsonl (default: lm-eval's own dataset)",
    ),
    OptionSpec(
        "allreduce-gsm8k-limit", None, "GSM8K test questions per backend (default: all 1319)"
    ),
    OptionSpec(
        "allreduce-gsm8k-fewshot",
        f"{DEFAULT_FEWSHOT}",
        f"few-shot examples per GSM8K question (default: {DEFAULT_FEWSHOT})",
    ),
    OptionSpec(
        "allreduce-gsm8k-endpoints",
        None,
        "NAME=URL,...: running OpenAI-compatible servers to compare on GSM8K (one server per "
        "backend configuration) instead of the backends in-process",
    ),
    OptionSpec(
        "allreduce-gsm8k-reference",
        None,
        "the reference backend (default: nccl on CUDA, gloo on the CPU) or, with endpoints, "
        "the reference endpoint's NAME (default: the first)",
    ),
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
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    model: str = "tiny"
    gsm8k_data: Path | None = None
    gsm8k_limit: int | None = None
    gsm8k_fewshot: int = DEFAULT_FEWSHOT
    gsm8k_endpoints: tuple[tuple[str, str], ...] = ()
    gsm8k_reference: str | None = None
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
            raise pytest.UsageError(f"{source}={_shown(text)}: {exc}") from None

    def optional(name: str, parse: Callable[[str], T]) -> T | None:
        return None if raw[name][1] is None else get(name, parse)

    endpoints = optional("allreduce-gsm8k-endpoints", parse_endpoints) or ()

    return Options(
        backends=get("allreduce-backends", parse_backend_list),
        device=get("allreduce-device", lambda t: parse_choice(t, DEVICES)),
        world_sizes=get(
            "allreduce-world-sizes", lambda t: parse_int_list(t, bounds.MAX_WORLD_SIZE)
        ),
        hidden_sizes=get(
            "allreduce-hidden-sizes", lambda t: parse_int_list(t, bounds.MAX_HIDDEN_SIZE)
        ),
        batch_sizes=get(
            "allreduce-batch-sizes", lambda t: parse_int_list(t, bounds.MAX_BATCH_SIZE)
        ),
        dtypes=get("allreduce-dtypes", parse_dtype_list),
        output_dir=get("allreduce-output-dir", parse_output_dir),
        timeout_s=get("allreduce-timeout", bounds.parse_seconds),
        startup_timeout_s=get("allreduce-startup-timeout", bounds.parse_seconds),
        baseline=optional("allreduce-baseline", parse_baseline),
        save_baseline=optional("allreduce-save-baseline", parse_save_baseline),
        model=get("allreduce-model", parse_model),
        gsm8k_data=optional("allreduce-gsm8k-data", parse_gsm8k_data),
        gsm8k_limit=optional(
            "allreduce-gsm8k-limit", lambda t: bounds.parse_count(t, MAX_GSM8K_QUESTIONS)
        ),
        gsm8k_fewshot=get("allreduce-gsm8k-fewshot", parse_fewshot),
        gsm8k_endpoints=endpoints,
        gsm8k_reference=optional(
            "allreduce-gsm8k-reference", lambda t: parse_reference(t, endpoints)
        ),
        max_tokens=get(
            "allreduce-max-tokens", lambda t: bounds.parse_count(t.strip(), MAX_TOKENS_LIMIT)
        ),
    )


def check_baseline_device(path: Path, device: str, device_name: str | None = None) -> None:
    """Refuse a baseline recorded on another kind of device, as a usage error.

    Call at configure time once the plan's device ('cuda' or 'cpu') is known, and again with
    `device_name` (the artifact label, e.g. NVIDIA_H200) where it is known before tests run.
    parse_options has already checked that the file is a valid baseline.
    """
    from .gate import BaselineError, load_baseline

    try:
        header, _ = load_baseline(path)
    except BaselineError as exc:
        raise pytest.UsageError(f"--allreduce-baseline={_shown(str(path))}: {exc}") from None
    theirs = (header["device"], header["device_name"])
    if theirs[0] != device or (device_name is not None and theirs[1] != device_name):
        ours = device if device_name is None else f"{device_name} ({device})"
        raise pytest.UsageError(
            f"--allreduce-baseline={_shown(str(path))}: recorded on {theirs[1]} ({theirs[0]}), "
            f"this session runs on {ours}; latencies are not comparable across devices: record "
            "a baseline for this device with --allreduce-save-baseline"
        )


# ---- value parsers (ValueError messages say what is allowed) -------------------------------


def _shown(text: str | None) -> str:
    """An option value quoted for an error, cut short when long."""
    if text is None or len(text) <= 80:
        return repr(text)
    return f"{text[:60]!r}... ({len(text)} characters)"


def _items(text: str) -> list[str]:
    """Comma- or blank-separated items; an empty item ('2,,4', '2,') is an error."""
    items: list[str] = []
    parts = text.split(",")
    for part in parts:
        words = part.split()
        if not words:
            if len(parts) == 1:
                raise ValueError("empty list")
            raise ValueError("empty item in the list (two commas in a row, or one at an end)")
        items += words
    return items


def _no_repeats(items: Sequence[str]) -> None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{item!r} is listed twice")
        seen.add(item)


def parse_choice(text: str, allowed: Sequence[str]) -> str:
    value = text.strip().lower()
    if value not in allowed:
        raise ValueError(f"allowed values: {', '.join(allowed)}")
    return value


def parse_int_list(text: str, high: int) -> tuple[int, ...]:
    """'1,2,32:64:8' -> (1, 2, 32, 40, 48, 56, 64), each value 1..high, sorted.

    A value listed twice (also by overlapping ranges) is an error. A range's length is
    computed from its ends before it is expanded, so a range of a billion values costs
    nothing and is refused by the count bound.
    """
    values: dict[int, str] = {}
    for item in _items(text):
        if ":" in item:
            parts = item.split(":")
            if len(parts) not in (2, 3):
                raise ValueError(f"range {item!r} must be a:b or a:b:step")
            start = bounds.parse_count(parts[0], high)
            stop = bounds.parse_count(parts[1], high)
            step = bounds.parse_count(parts[2], high) if len(parts) == 3 else 1
            if stop < start:
                raise ValueError(
                    f"range {item!r} ends before it starts; a range is a:b or a:b:step with a <= b"
                )
            members = range(start, stop + 1, step)
        else:
            value = bounds.parse_count(item, high)
            members = range(value, value + 1)
        if len(values) + len(members) > bounds.MAX_LIST_VALUES:
            raise ValueError(
                f"more than {bounds.MAX_LIST_VALUES} values (up to {item!r}); give fewer values "
                "or a range with a larger step"
            )
        for value in members:
            if value in values:
                raise ValueError(f"{value} is listed twice (in {values[value]!r} and {item!r})")
            values[value] = item
    return tuple(sorted(values))


def parse_dtype_list(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for item in _items(text):
        name = item.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {item!r}; allowed: {', '.join(DTYPES)}")
        names.append(name)
    _no_repeats(names)
    return tuple(names)


def parse_backend_list(text: str) -> tuple[str, ...]:
    """Names are checked against the registry later, once every plugin has registered."""
    items = _items(text)
    if "all" in items and len(items) > 1:
        raise ValueError("'all' cannot be combined with other names")
    _no_repeats(items)
    return tuple(items)


def parse_output_dir(text: str) -> Path:
    if problem := output_dir_problem(text):
        raise ValueError(problem)
    return Path(text)


def parse_baseline(text: str) -> Path:
    """A readable, valid baseline file (its device is checked by check_baseline_device)."""
    from .gate import BaselineError, load_baseline

    if not text.strip():
        raise ValueError("empty path; leave the option out to run without a baseline gate")
    path = Path(text)
    try:
        content = read_regular_file(path, MAX_BASELINE_BYTES)
    except UnusableFile as exc:
        if not os.path.lexists(text):
            raise ValueError("no such baseline file") from None
        raise ValueError(str(exc)) from None
    if not content.strip():
        raise ValueError(f"{path}: the baseline file is empty")
    try:
        load_baseline(path)
    except BaselineError as exc:
        raise ValueError(str(exc)) from None
    return path


def parse_save_baseline(text: str) -> Path:
    if problem := output_file_problem(text):
        raise ValueError(problem)
    return Path(text)


def parse_model(text: str) -> str:
    """'tiny', a directory holding config.json, or a .gguf file (checked in full, with the
    weights, when the accuracy suite first needs the model)."""
    value = text.strip()
    if value == "tiny":
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: a model directory needs a config.json")
        return str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be a .gguf file")
        return str(path)
    raise ValueError("not 'tiny', a model directory or a .gguf file: no such path")


def parse_gsm8k_data(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ValueError("not a directory (it must hold GSM8K's train.jsonl and test.jsonl)")
    missing = [n for n in ("train.jsonl", "test.jsonl") if not (path / n).is_file()]
    if missing:
        raise ValueError(f"{path} lacks {' and '.join(missing)}")
    return path


def parse_fewshot(text: str) -> int:
    if text.strip() == "0":
        return 0
    return bounds.parse_count(text.strip(), MAX_FEWSHOT)


def parse_endpoints(text: str) -> tuple[tuple[str, str], ...]:
    """NAME=URL,... with distinct identifier names and http(s) URLs."""
    from urllib.parse import urlsplit

    pairs: list[tuple[str, str]] = []
    for item in _items(text):
        name, sep, url = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"{item!r} is not NAME=URL (NAME an identifier)")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{item!r}: {url!r} is not an http(s) URL")
        pairs.append((name, url))
    _no_repeats([n for n, _ in pairs])
    if len(pairs) < 2:
        raise ValueError("give at least two endpoints: a reference and one to compare")
    return tuple(pairs)


def parse_reference(text: str, endpoints: tuple[tuple[str, str], ...]) -> str:
    """An endpoint's name when endpoints are given; else a backend name, checked against the
    registry once the plan exists."""
    name = text.strip()
    if endpoints and name not in dict(endpoints):
        raise ValueError(f"not one of the endpoints: {', '.join(n for n, _ in endpoints)}")
    if not name.isidentifier():
        raise ValueError(f"{name!r} is not a backend or endpoint name")
    return name
