"""A GGUF model file opened once (mmap), with typed metadata and lazily dequantized tensors."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from imatrix.errors import ImatrixError

GGUF_MAGIC = b"GGUF"


class GGUFModelFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_gguf(self.path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise ImatrixError(f"{self.path}: corrupt GGUF file ({exc})") from exc
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ImatrixError(f"{self.path}: metadata key '{key}' is missing")
        return value

    @cached_property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        return self.get(f"{self.architecture}.{suffix}", default)

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy order (outermost first), i.e. ggml's ne reversed."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def tensor_f32(self, name: str) -> np.ndarray:
        """Dequantize one tensor on demand (the file stays mmapped; nothing else is read)."""
        tensor = self.tensors[name]
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            data = np.asarray(tensor.data, dtype=np.float32)
        else:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        return data.reshape(self.shape(name))


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise ImatrixError(f"{path}: no such model file or directory")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot read: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ImatrixError(f"{path}: not a GGUF file (bad magic {magic!r})")
