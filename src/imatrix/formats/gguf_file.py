"""GGUF imatrix files, as written by llama.cpp's `IMatrixCollector::save_imatrix`."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from imatrix.errors import ImatrixError
from imatrix.formats.atomic import atomic_path
from imatrix.matrix import ImportanceMatrix, TensorStats

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


def read_gguf_imatrix(path: Path) -> ImportanceMatrix:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise ImatrixError(f"{path}: not a readable GGUF imatrix ({exc})") from exc
    if not reader.tensors:
        raise ImatrixError(f"{path}: the file holds no tensors")
    sums_for: dict[str, np.ndarray] = {}
    counts_for: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor '{tensor.name}' must be F32")
        # ggml's ne is [n_cols, n_mat]; numpy sees it reversed
        n_cols = int(tensor.shape[0])
        data = np.array(tensor.data, dtype=np.float32).reshape(-1, n_cols)
        if tensor.name.endswith(SUMS_SUFFIX):
            sums_for[tensor.name[: -len(SUMS_SUFFIX)]] = data
        elif tensor.name.endswith(COUNTS_SUFFIX):
            counts_for[tensor.name[: -len(COUNTS_SUFFIX)]] = data.reshape(-1)
    matrix = ImportanceMatrix(
        chunk_size=_scalar(reader, KEY_CHUNK_SIZE),
        chunk_count=_scalar(reader, KEY_CHUNK_COUNT),
        datasets=_strings(reader, KEY_DATASETS),
    )
    for name in sorted(set(sums_for) | set(counts_for)):
        if name not in sums_for or name not in counts_for:
            raise ImatrixError(f"{path}: mismatched sums and counts for '{name}'")
        counts = np.rint(counts_for[name]).astype(np.int64)
        sums = sums_for[name].reshape(counts.size, -1) if counts.size > 1 else sums_for[name].reshape(1, -1)
        matrix.tensors[name] = TensorStats(sums, counts)
    return matrix


def _scalar(reader: gguf.GGUFReader, key: str) -> int:
    field = reader.get_field(key)
    return int(field.contents()) if field is not None else 0


def _strings(reader: gguf.GGUFReader, key: str) -> list[str]:
    field = reader.get_field(key)
    return list(field.contents()) if field is not None else []


def write_gguf_imatrix(matrix: ImportanceMatrix, path: Path) -> None:
    writer = gguf.GGUFWriter(path=None, arch="")
    # gguf-py always adds general.architecture; llama.cpp's imatrix files have none
    writer.kv_data[0].clear()
    writer.add_string(KEY_TYPE, "imatrix")
    writer.add_array(KEY_DATASETS, list(matrix.datasets))
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
