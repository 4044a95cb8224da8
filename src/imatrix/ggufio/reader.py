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
__all__ = ["GGUF_MAGIC", "GGUFModelFile", "GGUFModelParts", "MappedPages", "MetadataField", "TensorInfo", "is_gguf",
           "shown", "split_path"]


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


class _Metadata:
    """The metadata accessors of a GGUF file or of a split model's first part."""

    path: Path
    metadata: dict[str, Any]  # every key, its strings decoded

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


class GGUFModelFile(_Metadata):
    fields: dict[str, MetadataField]  # every metadata key with its stored type and raw string bytes, in file order

    def __init__(self, path: str | Path, allow_split: bool = False) -> None:
        """`allow_split`: open one part of a split model as it is (`GGUFModelParts` reads all of them)."""
        self.path = Path(path)
        _check_gguf(self.path)
        # copy-on-write, so that weights can be used in place as (writable) tensors; nothing writes to it
        self.mmap = np.memmap(self.path, dtype=np.uint8, mode="c")
        self.pages = MappedPages(self.mmap)
        header = parse_header(memoryview(self.mmap), self.path)
        self.fields, self.tensors = header.fields, header.tensors
        self.metadata = {key: decoded(field.value) for key, field in self.fields.items()}
        n_split = self.metadata.get("split.count") or 1
        # one shard alone would pass for a model with tensors missing
        if isinstance(n_split, int) and n_split > 1 and not allow_split:
            shard = int(self.metadata.get("split.no") or 0) + 1
            raise ImatrixError(f"{self.path}: part {shard} of a model split in {n_split} files: merge them into "
                               "one first (llama-gguf-split --merge)")

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


def split_path(prefix: str, index: int, count: int) -> Path:
    """The file of part `index` (from 0) of `count`, as gguf-split and llama.cpp name it (`llama_split_path`)."""
    return Path(f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf")


class GGUFModelParts(_Metadata):
    """A model in one GGUF file, or split by gguf-split into `<prefix>-00001-of-0000n.gguf` ... files,
    read as one from the first: metadata from the first file, tensors from all of them, checked as
    llama.cpp's model loader checks them. `part_of[name]` is the index of the file holding a tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        first = GGUFModelFile(self.path, allow_split=True)
        self.fields, self.metadata = first.fields, first.metadata
        self.parts = [first, *self._other_parts(first)]
        self.tensors: dict[str, TensorInfo] = {}
        self.part_of: dict[str, int] = {}
        for index, part in enumerate(self.parts):
            for name, info in part.tensors.items():
                if name in self.tensors:
                    raise ImatrixError(f"{part.path}: invalid model: tensor {shown(name)} is duplicated")
                self.tensors[name], self.part_of[name] = info, index
        expected = self.metadata.get("split.tensors.count")
        if len(self.parts) > 1 and expected != len(self.tensors):
            raise ImatrixError(f"{self.path}: corrupted model: {expected} tensors expected but {len(self.tensors)} "
                               f"found in its {len(self.parts)} parts")

    def _other_parts(self, first: GGUFModelFile) -> list[GGUFModelFile]:
        count = first.metadata.get("split.count") or 1
        if not isinstance(count, int) or isinstance(count, bool):
            raise ImatrixError(f"{self.path}: split.count is not a number ({count!r})")
        if count <= 1:
            return []
        index = first.metadata.get("split.no")
        if index != 0:
            raise ImatrixError(f"{self.path}: part {'?' if index is None else int(index) + 1} of a model split in "
                               f"{count} files: open the first part")
        suffix = split_path("", 0, count).name
        if not self.path.name.endswith(suffix) or self.path.name == suffix:
            raise ImatrixError(f"{self.path}: invalid split file name (the first of {count} parts ends in {suffix})")
        prefix = str(self.path)[: -len(suffix)]
        parts = []
        for index in range(1, count):
            path = split_path(prefix, index, count)
            if not path.is_file():
                raise ImatrixError(f"{path}: part {index + 1} of the split model {self.path} is missing")
            part = GGUFModelFile(path, allow_split=True)
            if part.metadata.get("split.no") != index:
                raise ImatrixError(f"{path}: invalid split file: split.no is {part.metadata.get('split.no')}, "
                                   f"expected {index}")
            parts.append(part)
        return parts

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes in its file's mmap (see `GGUFModelFile.raw`)."""
        return self.parts[self.part_of[name]].raw(name)

    def release_pages(self, name: str, byte_range: tuple[int, int] | None = None) -> None:
        self.parts[self.part_of[name]].release_pages(name, byte_range)


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
