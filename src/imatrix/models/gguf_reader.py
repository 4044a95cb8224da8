"""A GGUF model file opened once (mmap), with typed metadata and lazily dequantized tensors.

gguf-py's `GGUFReader` builds a numpy view per string of every metadata array, which costs ~4 s
for a 49k-token vocab plus its merges; this parser reads the same header in a fraction of that
and leaves tensor data in the mmap until a tensor is asked for (dequantized by gguf-py, or by
the project's own class for a type of ours such as Q3_K_HIFI).
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from imatrix.errors import ImatrixError
from imatrix.quant.base import dequantize, tensor_type, type_sizes

GGUF_MAGIC = b"GGUF"
_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: innermost (row length) first
    tensor_type: enum.IntEnum  # ggml's GGMLQuantizationType, or a project type such as Q3_K_HIFI
    offset: int  # absolute, in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first)."""
        return tuple(reversed(self.ne))

    @property
    def n_bytes(self) -> int:
        block_size, type_size = type_sizes(self.tensor_type)
        return int(np.prod(self.ne)) // block_size * type_size


@dataclass(frozen=True)
class MetadataField:
    """A metadata value exactly as stored: strings as raw bytes, with the value (and item) type."""

    value: Any
    value_type: gguf.GGUFValueType
    item_type: gguf.GGUFValueType | None = None


class _Header:
    """Reads the header in file order; strings come back as raw bytes (decoded by the caller)."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        length = _U64.unpack_from(self.data, self.pos)[0]
        start = self.pos + 8
        self.pos = start + length
        if self.pos > len(self.data):
            raise ImatrixError(f"{self.path}: truncated GGUF header")
        return bytes(self.data[start : self.pos])

    def strings(self, count: int) -> list[bytes]:
        """`count` strings in a row (a vocabulary: the hot loop of opening a model)."""
        data, pos, unpack, out = self.data, self.pos, _U64.unpack_from, []
        for _ in range(count):
            length = unpack(data, pos)[0]
            pos += 8
            out.append(bytes(data[pos : pos + length]))
            pos += length
        if pos > len(data):
            raise ImatrixError(f"{self.path}: truncated GGUF header")
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        kind = gguf.GGUFValueType(kind)
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if kind == gguf.GGUFValueType.ARRAY:
            item_kind = self.scalar("<I")
            count = self.scalar("<Q")
            if item_kind in _SCALARS:
                dtype = np.dtype(_SCALARS[gguf.GGUFValueType(item_kind)])
                values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return values.tolist()
            if item_kind == gguf.GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item_kind) for _ in range(count)]
        return self.scalar(_SCALARS[kind])


def _decoded(value: Any) -> Any:
    """A stored value with its strings (raw bytes) decoded as UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [item.decode("utf-8", errors="replace") for item in value]
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [_decoded(item) for item in value]
    return value


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
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, ValueError, KeyError) as exc:
            raise ImatrixError(f"{self.path}: corrupt GGUF file ({exc})") from exc
        n_split = int(self.metadata.get("split.count") or 1)
        if n_split > 1:  # one shard alone would pass for a model with tensors missing
            shard = int(self.metadata.get("split.no") or 0) + 1
            raise ImatrixError(f"{self.path}: part {shard} of a model split in {n_split} files: merge them into "
                               "one first (llama-gguf-split --merge)")

    def _start(self) -> tuple[_Header, int, int]:
        header = _Header(memoryview(self.mmap), self.path)
        header.pos = 4
        version = header.scalar("<I")
        if version not in (2, 3):
            raise ImatrixError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors, n_kv = header.scalar("<Q"), header.scalar("<Q")
        return header, n_tensors, n_kv

    def _parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        header, n_tensors, n_kv = self._start()
        fields = {}
        for _ in range(n_kv):
            key = header.string().decode("utf-8", errors="replace")
            kind = gguf.GGUFValueType(header.scalar("<I"))
            item_kind = None
            if kind == gguf.GGUFValueType.ARRAY:
                item_kind = gguf.GGUFValueType(_U32.unpack_from(header.data, header.pos)[0])
            fields[key] = MetadataField(header.value(kind), kind, item_kind)
        self.fields = fields
        metadata = {key: _decoded(field.value) for key, field in fields.items()}
        infos = []
        for _ in range(n_tensors):
            name = header.string().decode("utf-8", errors="replace")
            n_dims = header.scalar("<I")
            ne = tuple(header.scalar("<Q") for _ in range(n_dims))
            infos.append((name, ne, self._tensor_type(header.scalar("<I")), header.scalar("<Q")))
        alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-header.pos // alignment) * alignment
        tensors = {name: TensorInfo(name, ne, kind, data_start + offset) for name, ne, kind, offset in infos}
        for info in tensors.values():
            if info.offset + info.n_bytes > self.mmap.size:
                raise ImatrixError(f"{self.path}: truncated file (tensor '{info.name}' runs past the end)")
        return metadata, tensors

    def _tensor_type(self, type_id: int) -> enum.IntEnum:
        try:
            return tensor_type(type_id)
        except ImatrixError as exc:
            raise ImatrixError(f"{self.path}: {exc}") from None

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
        return dequantize(self.raw(name), info.tensor_type).reshape(info.shape)


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
