"""GGUF imatrix files, as written by llama.cpp's `IMatrixCollector::save_imatrix`."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from imatrix.errors import ImatrixError
from imatrix.formats.atomic import atomic_path
from imatrix.matrix import ImportanceMatrix, TensorStats
from imatrix.models.gguf_writer import ModelWriter

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


U32_MAX = 2**32 - 1
MAX_COUNT = 2**62  # counts become int64; F32 cannot hold more anyway


def read_gguf_imatrix(path: Path) -> ImportanceMatrix:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise ImatrixError(f"{path}: not a readable GGUF imatrix ({exc})") from exc
    _check_is_imatrix(reader, path)
    if not reader.tensors:
        raise ImatrixError(f"{path}: the file holds no tensors")
    sums_for: dict[str, np.ndarray] = {}
    counts_for: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor '{tensor.name}' must be F32")
        data = np.array(tensor.data, dtype=np.float32)
        if not data.size:
            raise ImatrixError(f"{path}: tensor '{tensor.name}' is empty")
        if tensor.name.endswith(SUMS_SUFFIX):
            # ggml's ne is [n_cols, n_mat]; numpy sees it reversed
            sums_for[tensor.name[: -len(SUMS_SUFFIX)]] = data.reshape(-1, int(tensor.shape[0]))
        elif tensor.name.endswith(COUNTS_SUFFIX):
            counts_for[tensor.name[: -len(COUNTS_SUFFIX)]] = data.reshape(-1)
    matrix = ImportanceMatrix(
        chunk_size=_integer(reader, KEY_CHUNK_SIZE, path),
        chunk_count=_integer(reader, KEY_CHUNK_COUNT, path),
        datasets=_strings(reader, KEY_DATASETS),
    )
    for name in sorted(set(sums_for) | set(counts_for)):
        if name not in sums_for or name not in counts_for:
            raise ImatrixError(f"{path}: mismatched sums and counts for '{name}'")
        matrix.tensors[name] = _stats(path, name, sums_for[name], counts_for[name])
    return matrix


def _check_is_imatrix(reader: gguf.GGUFReader, path: Path) -> None:
    field = reader.get_field(KEY_TYPE)
    kind = field.contents() if field is not None and field.types == [gguf.GGUFValueType.STRING] else None
    if kind == "model" or (kind is None and reader.get_field("general.architecture") is not None):
        raise ImatrixError(f"{path}: a model, not an imatrix")
    if kind not in (None, "imatrix"):
        raise ImatrixError(f"{path}: not an imatrix (general.type is '{kind}')")


def _stats(path: Path, name: str, sums: np.ndarray, raw_counts: np.ndarray) -> TensorStats:
    if not np.isfinite(raw_counts).all() or (raw_counts < 0).any() or (raw_counts > MAX_COUNT).any():
        raise ImatrixError(f"{path}: '{name}' has token counts that are negative, too large or not numbers")
    if sums.size % raw_counts.size:
        raise ImatrixError(f"{path}: '{name}' has {sums.size} values for {raw_counts.size} counts")
    counts = np.rint(raw_counts).astype(np.int64)
    return TensorStats(sums.reshape(counts.size, -1), counts)


def _integer(reader: gguf.GGUFReader, key: str, path: Path) -> int:
    field = reader.get_field(key)
    if field is None:
        return 0
    value = field.contents()
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ImatrixError(f"{path}: {key} is not a count ({value!r})")
    return value


def _strings(reader: gguf.GGUFReader, key: str) -> list[str]:
    """A string array; anything else is ignored, as llama.cpp's loader does. Undecodable bytes (a path in
    another encoding) are replaced rather than refused."""
    field = reader.get_field(key)
    # gguf-py types an empty array [ARRAY] alone
    if field is None or field.types[1:] != [gguf.GGUFValueType.STRING]:
        return []
    return [bytes(field.parts[index]).decode("utf-8", errors="replace") for index in field.data]


def write_gguf_imatrix(matrix: ImportanceMatrix, path: Path) -> None:
    if matrix.chunk_count > U32_MAX:
        raise ImatrixError(f"{path}: a chunk count of {matrix.chunk_count} does not fit the file's 32 bits")
    writer = ModelWriter(path=None, arch="")
    # gguf-py always adds general.architecture; llama.cpp's imatrix files have none
    writer.kv_data[0].clear()
    writer.add_string(KEY_TYPE, "imatrix")
    # even empty, as llama.cpp writes it: llama-quantize refuses a file without it
    writer.add_key_value(KEY_DATASETS, list(matrix.datasets), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    writer.add_uint32(KEY_CHUNK_COUNT, int(matrix.chunk_count))
    writer.add_uint32(KEY_CHUNK_SIZE, int(matrix.chunk_size))
    for name in matrix.names():
        stats = matrix.tensors[name]
        sums = stats.sums if stats.n_mat > 1 else stats.sums.reshape(-1)
        counts = stats.counts.astype(np.float32).reshape(stats.n_mat, 1)
        writer.add_tensor(name + SUMS_SUFFIX, np.ascontiguousarray(sums, dtype=np.float32))
        writer.add_tensor(name + COUNTS_SUFFIX, counts if stats.n_mat > 1 else counts.reshape(1))
    with atomic_path(path) as tmp:
        writer.path = tmp
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
