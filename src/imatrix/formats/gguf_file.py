"""GGUF imatrix files, as written by llama.cpp's `IMatrixCollector::save_imatrix`."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from imatrix.errors import ImatrixError, shown
from imatrix.formats.atomic import atomic_path
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.ggufio.writer import ModelWriter
from imatrix.matrix import ImportanceMatrix, TensorStats, statistics_problem

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_RUN_PREFIX = "imatrix.resume."  # our own: the run that wrote the file (collection.resume); llama.cpp ignores them
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
VT = gguf.GGUFValueType


U32_MAX = 2**32 - 1


def read_gguf_imatrix(path: Path) -> ImportanceMatrix:
    source = GGUFModelFile(path)
    _check_is_imatrix(source)
    if not source.tensors:
        raise ImatrixError(f"{path}: the file holds no tensors")
    sums_for: dict[str, np.ndarray] = {}
    counts_for: dict[str, np.ndarray] = {}
    for name, info in source.tensors.items():
        if info.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {shown(name)} must be F32")
        data = np.array(source.tensor_f32(name), dtype=np.float32)  # a copy: the file may be replaced later
        if not data.size:
            raise ImatrixError(f"{path}: tensor {shown(name)} is empty")
        if name.endswith(SUMS_SUFFIX):
            # ggml's ne is [n_cols, n_mat]
            sums_for[name[: -len(SUMS_SUFFIX)]] = data.reshape(-1, int(info.ne[0]))
        elif name.endswith(COUNTS_SUFFIX):
            counts_for[name[: -len(COUNTS_SUFFIX)]] = data.reshape(-1)
    matrix = ImportanceMatrix(
        chunk_size=_integer(source, KEY_CHUNK_SIZE),
        chunk_count=_integer(source, KEY_CHUNK_COUNT),
        datasets=_strings(source, KEY_DATASETS),
        run_keys=_run_keys(source),
    )
    for name in sorted(set(sums_for) | set(counts_for)):
        if name not in sums_for or name not in counts_for:
            raise ImatrixError(f"{path}: mismatched sums and counts for {shown(name)}")
        matrix.tensors[name] = _stats(path, name, sums_for[name], counts_for[name])
    return matrix


def _check_is_imatrix(source: GGUFModelFile) -> None:
    field = source.fields.get(KEY_TYPE)
    kind = source.metadata[KEY_TYPE] if field is not None and field.value_type == VT.STRING else None
    if kind == "model" or (kind is None and "general.architecture" in source.fields):
        raise ImatrixError(f"{source.path}: a model, not an imatrix")
    if kind not in (None, "imatrix"):
        raise ImatrixError(f"{source.path}: not an imatrix (general.type is '{kind}')")


def _stats(path: Path, name: str, sums: np.ndarray, raw_counts: np.ndarray) -> TensorStats:
    """One tensor's statistics: `sums` as stored (`[n_mat, n_cols]` by its ne), one count per matrix, or one
    count for all of them (a 3-D dense weight, or a file from before per-expert counts)."""
    problem = statistics_problem(sums, raw_counts)
    if problem is not None:
        raise ImatrixError(f"{path}: tensor {shown(name)} has {problem}")
    if raw_counts.size not in (1, sums.shape[0]):
        raise ImatrixError(f"{path}: tensor {shown(name)} has {sums.shape[0]} matrices of sums but "
                           f"{raw_counts.size} counts")
    return TensorStats(sums.reshape(raw_counts.size, -1), raw_counts.astype(np.int64))


_INTEGER_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)


def _integer(source: GGUFModelFile, key: str) -> int:
    field = source.fields.get(key)
    if field is None:
        return 0
    value = source.metadata[key]
    if field.value_type not in _INTEGER_TYPES or value < 0:
        raise ImatrixError(f"{source.path}: {key} is not a count ({value!r})")
    return int(value)


def _strings(source: GGUFModelFile, key: str) -> list[str]:
    """A string array; anything else is ignored, as llama.cpp's loader does. Undecodable bytes (a path in
    another encoding) are replaced rather than refused."""
    field = source.fields.get(key)
    if field is None or field.value_type != VT.ARRAY or field.item_type != VT.STRING:
        return []
    return list(source.metadata[key])


def _run_keys(source: GGUFModelFile) -> dict[str, str | int]:
    """The imatrix.resume.* keys that hold a string or a whole number (collection.resume checks what they say)."""
    return {key: source.metadata[key] for key, field in source.fields.items()
            if key.startswith(KEY_RUN_PREFIX) and field.value_type in (VT.STRING, *_INTEGER_TYPES)}


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
    for key, value in sorted(matrix.run_keys.items()):
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint64(key, int(value))
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
