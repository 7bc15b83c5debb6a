"""What the model option names, turned into one Hugging Face directory the ranks load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .model_config import ModelConfig, ModelFormatError

TINY = "tiny"


@dataclass(frozen=True)
class ModelSource:
    """A model ready for the ranks: picklable, and cheap to send with every call."""

    name: str  # what was asked for: "tiny", a directory or a .gguf file
    path: str  # the Hugging Face directory ranks load
    fingerprint: str  # changes whenever the weights may have: ranks reload on a new one
    gguf_sha256: str | None = None  # of the GGUF file, when converted from one
    conversion_s: float | None = None  # time spent converting in this call (None: reused)


def prepare_model_source(
    spec: str, cache_dir: Path, *, gguf_workers: int | None = None
) -> ModelSource:
    """`tiny`, a Hugging Face model directory, or a GGUF file, as a ModelSource.

    The tiny model and GGUF conversions are written under `cache_dir` and reused when
    present. Raises ModelFormatError naming what is wrong with a path that cannot be used.
    """
    cache_dir = Path(cache_dir)
    if spec == TINY:
        return _tiny_source(cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        ModelConfig.load(path)
        from .checkpoint import weight_files

        files = weight_files(path)
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelFormatError(f"{path}: no tokenizer files (tokenizer.json)")
        return ModelSource(spec, str(path.resolve()), _stat_fingerprint(path, files.values()))
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_convert import convert_gguf

        conversion = convert_gguf(path, cache_dir, gguf_workers)
        return ModelSource(
            spec,
            str(conversion.model_dir),
            conversion.sha256,
            gguf_sha256=conversion.sha256,
            conversion_s=None if conversion.reused else conversion.seconds,
        )
    raise ModelFormatError(
        f"model {spec!r} is neither {TINY!r}, a Hugging Face model directory, nor a .gguf file"
    )


def _stat_fingerprint(model_dir: Path, files: Iterable[Path]) -> str:
    parts = []
    for f in sorted({Path(p) for p in files} | {model_dir / "config.json"}):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _tiny_source(cache_dir: Path) -> ModelSource:
    from .tiny import TinySpec, build_tiny_model

    spec = TinySpec()
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()
    final = cache_dir / f"tiny-{key[:16]}"
    if not (final / "config.json").is_file():
        tmp = cache_dir / f".tmp-tiny-{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_tiny_model(tmp, spec)
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(TINY, str(final), key)
