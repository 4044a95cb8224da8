"""Parsing a GGUF header (metadata and tensor infos) that is checked before it is trusted.

Every length and count is bounded by the bytes left in the file before anything is allocated, every
type id is checked, keys and tensor names must be unique, and tensor data must be aligned, inside
the file and not overlapping; any failure is one `ImatrixError` naming the file and the byte offset
or the tensor. gguf-py's `GGUFReader` trusts lengths (a flipped bit can make it allocate without
end) and builds a numpy view per string (~4 s for a 49k-token vocabulary and its merges).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from imatrix.errors import ImatrixError, shown
from imatrix.ggufio.types import tensor_type, type_sizes

VT = gguf.GGUFValueType
_SCALARS = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
_U64 = struct.Struct("<Q")
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
# the smallest a metadata entry (key length, type, one byte of value) and a tensor info can take
MIN_KV_BYTES, MIN_TENSOR_INFO_BYTES = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: innermost (row length) first
    tensor_type: enum.IntEnum  # ggml's GGMLQuantizationType, or a registered type such as Q3_K_HIFI
    offset: int  # absolute, in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first)."""
        return tuple(reversed(self.ne))

    @property
    def n_bytes(self) -> int:
        block_size, type_size = type_sizes(self.tensor_type)
        return int(np.prod(self.ne, dtype=object)) // block_size * type_size


@dataclass(frozen=True)
class MetadataField:
    """A metadata value exactly as stored: strings as raw bytes, with the value (and item) type."""

    value: Any
    value_type: gguf.GGUFValueType
    item_type: gguf.GGUFValueType | None = None


def decoded(value: Any) -> Any:
    """A stored value with its strings (raw bytes) decoded as UTF-8 (bytes that are not are replaced)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [item.decode("utf-8", errors="replace") for item in value]
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [decoded(item) for item in value]
    return value


@dataclass(frozen=True)
class Header:
    fields: dict[str, MetadataField]  # in file order
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Reads the header in file order; nothing is read past the end, nothing sized before it is bounded."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def fail(self, problem: str, at: int | None = None) -> ImatrixError:
        return ImatrixError(f"{self.path}: corrupt GGUF file at byte {self.pos if at is None else at}: {problem}")

    def take(self, n_bytes: int, what: str) -> int:
        """Advance over `n_bytes` of `what`; returns where they start."""
        if n_bytes > len(self.data) - self.pos:
            raise self.fail(f"{what} ({n_bytes} bytes) runs past the end of the file ({len(self.data)} bytes)")
        start, self.pos = self.pos, self.pos + n_bytes
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        start = self.take(self.scalar("<Q", f"length of {what}"), what)
        return bytes(self.data[start : self.pos])

    def strings(self, count: int, what: str) -> list[bytes]:
        """`count` strings in a row (a vocabulary: the hot loop of opening a model)."""
        self.bound(count, 8, what)
        data, pos, end, unpack, out = self.data, self.pos, len(self.data), _U64.unpack_from, []
        for _ in range(count):
            if pos + 8 > end:
                raise self.fail(f"{what} runs past the end of the file", pos)
            length = unpack(data, pos)[0]
            pos += 8
            if length > end - pos:
                raise self.fail(f"a string of {length} bytes in {what} runs past the end of the file", pos)
            out.append(bytes(data[pos : pos + length]))
            pos += length
        self.pos = pos
        return out

    def bound(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse a count that the bytes left could not hold (before anything is allocated for it)."""
        if count * item_bytes > len(self.data) - self.pos:
            raise self.fail(f"{what} claims {count} items, more than the rest of the file could hold")

    def value_type(self, what: str) -> VT:
        raw = self.scalar("<I", what)
        try:
            return VT(raw)
        except ValueError:
            raise self.fail(f"unknown value type {raw} for {what}", self.pos - 4) from None

    def field(self, what: str) -> MetadataField:
        kind = self.value_type(what)
        if kind != VT.ARRAY:
            return MetadataField(self.value(kind, what), kind)
        item_kind = self.value_type(f"item type of {what}")
        return MetadataField(self.array(item_kind, what, 1), kind, item_kind)

    def value(self, kind: VT, what: str, depth: int = 0) -> Any:
        if kind == VT.STRING:
            return self.string(what)
        if kind == VT.ARRAY:
            return self.array(self.value_type(f"item type of {what}"), what, depth + 1)
        return self.scalar(_SCALARS[kind], what)

    def array(self, item_kind: VT, what: str, depth: int) -> list:
        if depth > MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        count = self.scalar("<Q", f"length of {what}")
        if item_kind in _SCALARS:
            dtype = np.dtype(_SCALARS[item_kind])
            self.bound(count, dtype.itemsize, what)
            start = self.take(dtype.itemsize * count, what)
            return np.frombuffer(self.data, dtype=dtype, count=count, offset=start).tolist()
        if item_kind == VT.STRING:
            return self.strings(count, what)
        self.bound(count, 12, what)  # the least an inner array takes: its item type and length
        return [self.value(item_kind, what, depth) for _ in range(count)]


def parse_header(data: memoryview, path: Path) -> Header:
    cursor = _Cursor(data, path)
    cursor.take(4, "magic")
    version = cursor.scalar("<I", "version")
    if version not in (2, 3):
        raise ImatrixError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cursor.scalar("<Q", "tensor count"), cursor.scalar("<Q", "metadata count")
    cursor.bound(n_kv, MIN_KV_BYTES, "the metadata")
    fields = _metadata(cursor, n_kv)
    cursor.bound(n_tensors, MIN_TENSOR_INFO_BYTES, "the tensor list")
    infos = [_tensor_info(cursor) for _ in range(n_tensors)]
    alignment = _alignment(fields, cursor)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ne, kind, offset in infos:
        if name in tensors:
            raise ImatrixError(f"{path}: tensor {shown(name)} is listed twice")
        if offset % alignment:
            raise ImatrixError(f"{path}: tensor {shown(name)} has offset {offset}, not a multiple of the "
                               f"alignment {alignment}")
        tensors[name] = TensorInfo(name, ne, kind, data_start + offset)
    _check_data_layout(tensors, len(data), alignment, path)
    return Header(fields, tensors)


def _metadata(cursor: _Cursor, n_kv: int) -> dict[str, MetadataField]:
    fields: dict[str, MetadataField] = {}
    for index in range(n_kv):
        at = cursor.pos
        key = cursor.string(f"metadata key {index}").decode("utf-8", errors="replace")
        if key in fields:
            raise cursor.fail(f"metadata key {shown(key)} appears twice", at)
        fields[key] = cursor.field(f"metadata {shown(key)}")
    return fields


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], enum.IntEnum, int]:
    at = cursor.pos
    name = cursor.string("tensor name").decode("utf-8", errors="replace")
    n_dims = cursor.scalar("<I", f"dimension count of tensor {shown(name)}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.fail(f"tensor {shown(name)} has {n_dims} dimensions (1 to {MAX_DIMS})", at)
    ne = tuple(cursor.scalar("<Q", f"dimensions of tensor {shown(name)}") for _ in range(n_dims))
    type_id = cursor.scalar("<I", f"type of tensor {shown(name)}")
    try:
        kind = tensor_type(type_id)
        block_size, _ = type_sizes(kind)
    except ImatrixError:
        raise cursor.fail(f"tensor {shown(name)} has unknown type {type_id}", at) from None
    if ne[0] % block_size:
        raise cursor.fail(f"tensor {shown(name)} has rows of {ne[0]} values, not a multiple of its type's "
                          f"block of {block_size}", at)
    return name, ne, kind, cursor.scalar("<Q", f"offset of tensor {shown(name)}")


def _alignment(fields: dict[str, MetadataField], cursor: _Cursor) -> int:
    field = fields.get("general.alignment")
    if field is None:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    value = field.value
    if field.value_type != VT.UINT32 or value <= 0 or value & (value - 1):
        raise ImatrixError(f"{cursor.path}: general.alignment is {value!r}, not a power of two")
    return int(value)


def _check_data_layout(tensors: dict[str, TensorInfo], file_size: int, alignment: int, path: Path) -> None:
    """Every tensor's data inside the file, none sharing bytes with another, and each followed by the next
    (the last one by the file's end) within the alignment's padding, as every GGUF writer lays them out: a
    tensor whose dimensions were changed would otherwise read a different share of the data, or leave some
    unread."""
    ordered = sorted(tensors.values(), key=lambda info: info.offset)
    for info, following in zip(ordered, [*ordered[1:], None], strict=False):
        end = info.offset + info.n_bytes
        if end > file_size:
            raise ImatrixError(f"{path}: truncated file (tensor {shown(info.name)} runs past the end: bytes "
                               f"{info.offset}..{end} of {file_size})")
        next_start = file_size if following is None else following.offset
        if next_start < end:
            raise ImatrixError(f"{path}: tensors {shown(info.name)} and {shown(following.name)} overlap")
        if next_start - end >= alignment:  # the last tensor too: writers pad it, and nothing follows
            before = "the next one starts" if following is not None else "the end of the file"
            raise ImatrixError(f"{path}: tensor {shown(info.name)} ends {next_start - end} bytes before {before}: "
                               "its dimensions do not match its data")
