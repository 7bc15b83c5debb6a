"""The server config artifact: validated by the loader's own rules, then written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..config import (
    AllreduceConfig,
    ConfigError,
    check_backend_names,
    config_types,
    default_registry,
    device_kind,
    parse_config_text,
)
from .atomic import atomic_write

# The dtype whose selection names the config when it was planned (servers run bf16).
PREFERRED_CONFIG_DTYPE = "bfloat16"
CONFIG_DTYPE_RULE = (
    "the config file name carries no dtype, so the config is emitted from the "
    f"{PREFERRED_CONFIG_DTYPE} selection when {PREFERRED_CONFIG_DTYPE} was planned, "
    "else from the first planned dtype"
)


def default_config_dtype(dtypes: Sequence[str]) -> str:
    """The dtype whose selection is written to the config (see CONFIG_DTYPE_RULE)."""
    if not dtypes:
        raise ValueError("no dtype was planned")
    return PREFERRED_CONFIG_DTYPE if PREFERRED_CONFIG_DTYPE in dtypes else dtypes[0]


def write_config(path: str | os.PathLike[str], config: AllreduceConfig, device: object) -> Path:
    """Validate `config` for `device` ('cuda' or 'cpu') and write it atomically to `path`.

    The text is validated by the loader itself (file format and the consumer's entries and
    names) before anything touches the disk, so what is written always loads.
    """
    path = Path(path)
    if not isinstance(config, AllreduceConfig):
        raise TypeError(f"write_config takes an AllreduceConfig, got {type(config).__name__}")
    kind = device_kind(device)
    text = config.dumps()
    # The writer's output must pass the reader's rules, names included.
    check_backend_names(parse_config_text(text, str(path)), default_registry(), str(path))
    allowed = config_types(kind)
    bad = {k: e.backend_type for k, e in config.items() if e.backend_type not in allowed}
    if bad:
        shown = ", ".join(f"{k}: {t}" for k, t in bad.items())
        raise ConfigError(
            f"{path}: a {kind.upper()} config may only use backend types "
            f"{', '.join(sorted(allowed))}; got {shown}"
        )
    return atomic_write(path, text)
