"""A GGUF file (model or imatrix) opened once (mmap), with typed metadata and lazily dequantized tensors.

The header is parsed and checked by `ggufio.header`; tensor data stay in the mmap until a tensor is
asked for (dequantized by gguf-py, or by a registered type's own code, such as Q3_K_HIFI's).
"""

from __future__ import annotations

import contextlib
import mmap
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from imatrix.errors import ImatrixError, shown
from imatrix.ggufio.header import MetadataField, TensorInfo, decoded, parse_header
from imatrix.ggufio.types import dequantize

GGUF_MAGIC = b"GGUF"
__all__ = ["GGUF_MAGIC", "GGUFModelFile", "MappedPages", "MetadataField", "TensorInfo", "is_gguf", "shown"]


class MappedPages:
    """Gives the pages of parts of a mapped file back once they have been read.

    They stay in the page cache, so the next read is a minor fault, not disk I/O; without this every
    byte read stays counted in the process's resident set, and a model whose weights are read in
    place (or copied out) looks like a second copy of itself.
    """

    def __init__(self, mapped: np.memmap) -> None:
        self._mapping = getattr(mapped, "_mmap", None)
        self.base = int(mapped.ctypes.data)
        self.size = int(mapped.size)

    def release(self, address: int, n_bytes: int) -> None:
        """Release the pages under `[address, address + n_bytes)`; addresses outside the file are ignored."""
        offset = address - self.base
        if self._mapping is None or not hasattr(mmap, "MADV_DONTNEED") or not 0 <= offset < self.size:
            return
        # a page shared with a neighbouring tensor goes too: it is read back from the page cache on use
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            self._mapping.madvise(mmap.MADV_DONTNEED, start, min(offset + n_bytes, self.size) - start)


class GGUFModelFile:
    fields: dict[str, MetadataField]  # every metadata key with its stored type and raw string bytes, in file order

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_gguf(self.path)
        # copy-on-write, so that weights can be used in place as (writable) tensors; nothing writes to it
        self.mmap = np.memmap(self.path, dtype=np.uint8, mode="c")
        self.pages = MappedPages(self.mmap)
        header = parse_header(memoryview(self.mmap), self.path)
        self.fields, self.tensors = header.fields, header.tensors
        self.metadata = {key: decoded(field.value) for key, field in self.fields.items()}
        n_split = self.metadata.get("split.count") or 1
        if isinstance(n_split, int) and n_split > 1:  # one shard alone would pass for a model with tensors missing
            shard = int(self.metadata.get("split.no") or 0) + 1
            raise ImatrixError(f"{self.path}: part {shard} of a model split in {n_split} files: merge them into "
                               "one first (llama-gguf-split --merge)")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ImatrixError(f"{self.path}: metadata key '{key}' is missing")
        return self.metadata[key]

    @cached_property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def require_arch(self, suffix: str) -> Any:
        """The architecture's hyperparameter `suffix` (`block_count`, …), which the model cannot do without."""
        return self.require(f"{self.architecture}.{suffix}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes in the mmap, `uint8 [rows..., bytes per row]`; nothing is read yet."""
        info = self.tensors[name]
        data = self.mmap[info.offset : info.offset + info.n_bytes]
        return data.reshape(*info.shape[:-1], -1)

    def release_pages(self, name: str, byte_range: tuple[int, int] | None = None) -> None:
        """Drop a tensor's file pages (or those of `byte_range` within it) from this process's
        resident set once they have been read (see `MappedPages`)."""
        info = self.tensors[name]
        first, stop = byte_range or (0, info.n_bytes)
        self.pages.release(self.pages.base + info.offset + first, stop - first)

    def tensor_f32(self, name: str) -> np.ndarray:
        """Dequantize one tensor on demand (float32, numpy shape)."""
        info = self.tensors[name]
        if info.tensor_type == gguf.GGMLQuantizationType.F32:
            return self.raw(name).view(np.float32).reshape(info.shape)
        try:
            return dequantize(self.raw(name), info.tensor_type).reshape(info.shape)
        except (ValueError, TypeError) as exc:
            raise ImatrixError(f"{self.path}: tensor {shown(name)}: cannot dequantize ({exc})") from exc


def is_gguf(path: str | Path) -> bool:
    """Whether the file starts with GGUF's magic."""
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


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
