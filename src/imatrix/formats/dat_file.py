"""Legacy `.dat` imatrix files (llama.cpp's `save_imatrix_legacy` / `common_imatrix_load_legacy`).

Layout, little-endian: int32 n_entries; per entry int32 name_len, name bytes, int32 ncall,
int32 nval, float32[nval]; then optionally int32 chunk_count, int32 dataset_len, dataset bytes.
Values are stored as (sum / count) · ncall, so raw sums are lost and recovered as value · chunk_size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imatrix.errors import ImatrixError, shown
from imatrix.formats.atomic import atomic_path
from imatrix.matrix import ImportanceMatrix, TensorStats, statistics_problem

_INT = struct.Struct("<i")
INT32_MAX = 2**31 - 1
MAX_NAME_BYTES = 4096
MIN_ENTRY_BYTES = 4 + 1 + 4 + 4 + 4  # name length, one byte of name, ncall, nval, one value


@dataclass
class DatEntry:
    ncall: int
    values: np.ndarray  # float32 [nval], as stored: (sum / count) · ncall


@dataclass
class DatFile:
    entries: dict[str, DatEntry]
    chunk_count: int
    dataset: str | None


class _Cursor:
    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ImatrixError(f"{self.path}: truncated or corrupt imatrix at byte {self.pos} (while reading {what})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int32(self, what: str) -> int:
        return _INT.unpack(self.take(4, what))[0]

    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def parse_dat(path: Path, data: bytes) -> DatFile:
    cursor = _Cursor(path, data)
    n_entries = cursor.int32("the entry count")
    if not 0 < n_entries <= len(data) // MIN_ENTRY_BYTES:
        raise ImatrixError(f"{path}: truncated or corrupt imatrix ({n_entries} entries cannot fit in "
                           f"{len(data)} bytes)")
    entries: dict[str, DatEntry] = {}
    for index in range(n_entries):
        name_len = cursor.int32(f"entry {index + 1}'s name length")
        if not 0 < name_len <= MAX_NAME_BYTES:
            raise ImatrixError(f"{path}: not an imatrix file (bad name length {name_len})")
        name = cursor.take(name_len, f"entry {index + 1}'s name").decode("utf-8", errors="replace")
        if name in entries:
            raise ImatrixError(f"{path}: entry {shown(name)} appears twice")
        ncall = cursor.int32(f"{shown(name)}'s call count")
        nval = cursor.int32(f"{shown(name)}'s value count")
        if nval < 1:
            raise ImatrixError(f"{path}: corrupt entry {shown(name)} ({nval} values)")
        values = np.frombuffer(cursor.take(4 * nval, f"{shown(name)}'s values"), dtype="<f4").copy()
        problem = statistics_problem(values, np.array([ncall]))
        if problem is not None:
            raise ImatrixError(f"{path}: entry {shown(name)} has {problem.replace('token counts', 'call counts')}")
        entries[name] = DatEntry(ncall, values)
    chunk_count, dataset = 0, None
    if not cursor.at_end():
        chunk_count = cursor.int32("the chunk count")
        if not cursor.at_end():
            dataset_len = cursor.int32("the dataset name length")
            if dataset_len > 0:
                dataset = cursor.take(dataset_len, "the dataset name").decode("utf-8", errors="replace")
    return DatFile(entries, chunk_count, dataset)


def read_dat_imatrix(path: Path, chunk_size: int) -> ImportanceMatrix:
    """Raw sums as llama.cpp's `load_imatrix` rebuilds them: value · chunk_size, count ncall · chunk_size."""
    parsed = parse_dat(path, path.read_bytes())
    matrix = ImportanceMatrix(
        chunk_size=chunk_size,
        chunk_count=parsed.chunk_count,
        datasets=[parsed.dataset] if parsed.dataset else [],
    )
    scale = np.float32(chunk_size)
    for name, entry in parsed.entries.items():
        with np.errstate(over="ignore"):
            sums = (entry.values * scale).astype(np.float32)
        if not np.isfinite(sums).all():
            raise ImatrixError(f"{path}: entry {shown(name)} has values too large to be sums of squares")
        matrix.tensors[name] = TensorStats(sums.reshape(1, -1), [entry.ncall * chunk_size])
    return matrix


def dat_bytes(matrix: ImportanceMatrix) -> bytes:
    """Serialise as llama.cpp's `save_imatrix_legacy` does (entries with no data are skipped)."""
    chunk_size = matrix.chunk_size or 512
    stored = [name for name in matrix.names() if matrix.tensors[name].counts.any()]
    parts = [_INT.pack(len(stored))]
    for name in stored:
        stats = matrix.tensors[name]
        encoded = name.encode()
        # ceiling division, as llama.cpp does, so a partial chunk never stores a zero
        ncall = (int(stats.counts.max()) + chunk_size - 1) // chunk_size
        if ncall > INT32_MAX:
            raise ImatrixError(f"{shown(name)}: {ncall} chunks do not fit the .dat format's 32 bits")
        counts = stats.counts.astype(np.float32)
        values = stats.sums.copy()
        empty = counts == 0
        values[empty] = 1.0  # llama.cpp stores 1 for experts without data
        counts[empty] = 1.0
        legacy = (values / counts[:, None]) * np.float32(ncall)
        parts += [_INT.pack(len(encoded)), encoded, _INT.pack(ncall), _INT.pack(stats.sums.size)]
        parts.append(legacy.astype("<f4").tobytes())
    dataset = (matrix.datasets[-1] if matrix.datasets else "").encode()
    if matrix.chunk_count > INT32_MAX:
        raise ImatrixError(f"a chunk count of {matrix.chunk_count} does not fit the .dat format's 32 bits")
    parts += [_INT.pack(matrix.chunk_count), _INT.pack(len(dataset)), dataset]
    return b"".join(parts)


def write_dat_imatrix(matrix: ImportanceMatrix, path: Path) -> None:
    try:
        payload = dat_bytes(matrix)
    except ImatrixError as exc:
        raise ImatrixError(f"{path}: {exc}") from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
