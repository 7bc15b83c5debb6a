"""Reading a Hugging Face checkpoint directory: config.json plus model.safetensors, or shards
listed in model.safetensors.index.json. Tensors are read by slice, so a rank reads only its
own shard of each weight."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .model_config import ModelFormatError

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index}: not a safetensors index ({exc!r})") from None
        files = {name: model_dir / file for name, file in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise ModelFormatError(f"{index} names missing files: {', '.join(missing)}")
        return files
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise ModelFormatError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


class Checkpoint:
    """Open safetensors files of one model directory; use as a context manager."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.files = weight_files(self.model_dir)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise ModelFormatError(f"{self.model_dir}: no tensor {name!r} in the checkpoint")
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or only the given rows (dim 0) and columns (dim 1) of it."""
        part = self._handle(name).get_slice(name)
        if rows is None and cols is None:
            return part[:]
        if cols is None:
            return part[rows]
        return part[rows if rows is not None else slice(None), cols]
