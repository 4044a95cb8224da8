"""Whole-model GGUF quantization: llama-quantize's job, tensor by tensor from the mmapped input.

Metadata is copied as llama.cpp copies it (then `general.quantization_version` and
`general.file_type` are set, `--override-kv` applied, the `quantize.imatrix.*` keys added when an
imatrix is used, and the block count after `--prune-layers`), each set key moving to the end as
gguf's `gguf_set_val_*` moves it; tensors are written in llama.cpp's loader order (file order with
`--keep-split`, one output per input part) with 32-byte alignment. Everything that can refuse the
job (an imatrix a type needs, a missing kernel, an unreadable type) is checked before a byte is
written. The header is written first, which fixes every tensor's place in the file; each tensor's
rows are then converted in spans (on several forked worker processes when asked for more than one
thread) and written straight to their place, so memory stays near a few spans on top of the mapped
input.

`--dry-run` plans the same and reports sizes, writing nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import multiprocessing
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

import imatrix.quant  # noqa: F401  (registers every kernel)
from imatrix.errors import ImatrixError, shown
from imatrix.formats import load_imatrix
from imatrix.formats.atomic import atomic_path, check_not_an_input, check_output_path
from imatrix.ggufio.reader import GGUFModelFile, GGUFModelParts, TensorInfo, is_gguf, split_path
from imatrix.ggufio.types import dequantize, type_sizes
from imatrix.ggufio.writer import ModelWriter
from imatrix.matrix import ImportanceMatrix
from imatrix.quant.base import quant_type, quantize_rows
from imatrix.quant.mixes import (
    UNQUANTIZED,
    Cat,
    FileType,
    Overrides,
    allows_quantization,
    category,
    llama_order,
    parse_file_type,
    parse_tensor_type,
    plan_types,
    requires_imatrix,
    row_bytes,
    type_name,
)
from imatrix.quant.options import (
    KvOverride,
    QuantizeOptions,
    parse_override_kv,
    tensor_type_patterns,
)
from imatrix.quant.workers import Workers

QType = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType
GGML_QNT_VERSION = 2
MiB = 1024.0 * 1024.0
MIB_BYTES = 1 << 20
CHUNK_ELEMENTS = 1 << 18  # rows per work item: about this many values (kernel temporaries scale with it)
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
MAX_KV_STRING = 127  # llama-quantize stores the imatrix file and dataset in 128-byte buffers
LLAMA_FTYPE_GUESSED = 1024
Log = Callable[[str], None]


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (columns) first
    src_type: enum.IntEnum
    dst_type: enum.IntEnum
    src_bytes: int
    dst_bytes: int
    used_imatrix: bool = False

    @property
    def quantized(self) -> bool:
        return self.src_type != self.dst_type


@dataclass
class QuantizeReport:
    input_path: Path
    output_path: Path | None  # the first output file; None for a dry run
    ftype: str
    file_type: int
    tensors: list[TensorReport] = field(default_factory=list)
    missing_imatrix: list[str] = field(default_factory=list)  # quantized without imatrix data
    fallbacks: list[str] = field(default_factory=list)  # llama-quantize's fallback warning lines
    overrides: list[str] = field(default_factory=list)  # its "applying manual override" lines (--tensor-type)
    output_paths: list[Path] = field(default_factory=list)  # every file written (several with --keep-split)
    needs_imatrix: bool = False  # some tensor's type needs an imatrix (what --dry-run warns about)
    with_imatrix: bool = False  # imatrix data was used (some entry left after --include/--exclude-weights)
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def n_elements(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def src_bytes(self) -> int:
        return sum(t.src_bytes for t in self.tensors)

    @property
    def dst_bytes(self) -> int:
        return sum(t.dst_bytes for t in self.tensors)

    @property
    def src_bpw(self) -> float:
        return self.src_bytes * 8.0 / max(self.n_elements, 1)

    @property
    def dst_bpw(self) -> float:
        return self.dst_bytes * 8.0 / max(self.n_elements, 1)

    def types(self) -> dict[str, enum.IntEnum]:
        return {t.name: t.dst_type for t in self.tensors}


# --- input ---


def open_model(path: Path) -> GGUFModelParts:
    """The model at `path`, with the other parts of a split model (`<prefix>-00001-of-0000n.gguf`)."""
    if not path.is_file():
        raise ImatrixError(f"{path}: no such model file")
    model_file = GGUFModelParts(path)
    if model_file.get("general.type") == "imatrix":
        raise ImatrixError(f"{path}: is an importance matrix, not a model (an imatrix goes to --imatrix)")
    model_file.require("general.architecture")  # every model names its architecture
    return model_file


def _n_rows(ne: Sequence[int]) -> int:
    """Rows of a tensor of ggml shape `ne` (every dimension but the row length)."""
    return int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1


def _rows(model_file: GGUFModelParts, tensor: TensorInfo) -> np.ndarray:
    """The tensor's bytes as `[n_rows, row_bytes]` (a view of the mapped file)."""
    return np.asarray(model_file.raw(tensor.name)).reshape(_n_rows(tensor.ne), -1)


# --- conversions between float32 rows and stored bytes ---


def _to_f32(raw: np.ndarray, src: enum.IntEnum) -> np.ndarray:
    if src == QType.F32:
        return raw.view(np.float32)
    if src == QType.F16:
        return raw.view(np.float16).astype(np.float32)
    return dequantize(raw, src).reshape(raw.shape[0], -1)


def _from_f32(rows: np.ndarray, dst: enum.IntEnum, im_row: np.ndarray | None) -> np.ndarray:
    if dst == QType.F32:
        return np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8)
    if dst == QType.F16:
        return rows.astype(np.float16).view(np.uint8)
    if dst == QType.BF16:
        return np.ascontiguousarray(gguf.quants.quantize(rows, QType.BF16)).view(np.uint8).reshape(rows.shape[0], -1)
    return quantize_rows(rows, dst, im_row)  # type: ignore[arg-type]


def _check_convertible(path: Path, name: str, src: enum.IntEnum, dst: enum.IntEnum, allow_requantize: bool) -> None:
    if src not in UNQUANTIZED:
        if not allow_requantize:
            raise ImatrixError(
                f"{path}: {name} is already quantized ({type_name(src)}); requantizing needs --allow-requantize"
            )
        if not _can_dequantize(src):
            raise ImatrixError(f"{path}: {name}: cannot dequantize type {src.name}")
    if dst not in UNQUANTIZED:
        try:
            quant_type(dst)  # type: ignore[arg-type]
        except ImatrixError as exc:
            raise ImatrixError(f"{path}: {name}: {exc}") from None


def _can_dequantize(src: enum.IntEnum) -> bool:
    try:
        dequantize(np.zeros((1, type_sizes(src)[1]), dtype=np.uint8), src)
    except (NotImplementedError, ValueError, KeyError, ImatrixError):
        return False
    return True


@dataclass(frozen=True)
class Span:
    """Rows `[start, stop)` of one tensor to convert: a unit of work, small enough to send to a worker."""

    name: str  # the input tensor's name
    src: enum.IntEnum
    dst: enum.IntEnum
    start: int
    stop: int
    im_row: np.ndarray | None  # the imatrix row of the matrix (expert) these rows belong to
    offset: int  # where the converted rows go in the output file


def slab_rows(job: _Job, max_buffer_bytes: int) -> int:
    """Rows of one tensor held at a time under --max-buffer-size: llama.cpp counts a row's input bytes,
    output bytes and (unless the input is F32) its float32 copy."""
    n_cols = job.ne[0]
    per_row = row_bytes(job.src, n_cols) + row_bytes(job.dst, n_cols) + (0 if job.src == QType.F32 else 4 * n_cols)
    return max(1, max_buffer_bytes // max(per_row, 1))


def tensor_spans(job: _Job, data_offset: int, max_buffer_bytes: int = 8192 * MIB_BYTES) -> list[Span]:
    """About CHUNK_ELEMENTS values per span (fewer if --max-buffer-size asks); spans never cross a matrix
    (expert) boundary, each expert having its own imatrix row. `data_offset`: where the tensor's data starts
    in the output file."""
    n_cols = job.ne[0]
    n_rows = _n_rows(job.ne)
    rows_per_matrix = job.ne[1] if len(job.ne) > 1 else 1
    out_row_bytes = row_bytes(job.dst, n_cols)
    step = min(max(1, CHUNK_ELEMENTS // max(n_cols, 1)), slab_rows(job, max_buffer_bytes))
    spans = []
    for first in range(0, n_rows, rows_per_matrix):
        im_row = None if job.imatrix_rows is None else job.imatrix_rows[first // rows_per_matrix]
        for start in range(first, min(first + rows_per_matrix, n_rows), step):
            stop = min(start + step, first + rows_per_matrix, n_rows)
            spans.append(Span(job.tensor.name, job.src, job.dst, start, stop, im_row,
                              data_offset + start * out_row_bytes))
    return spans


def convert_span(model_file: GGUFModelParts, span: Span, output_fd: int) -> int:
    """Convert the span's rows and write them at their place in the output; returns the bytes written.

    Writing in place (rather than returning the rows) keeps worker results off the pipe to the
    parent, whose pickling and page faults had made two workers slower than one.
    """
    raw = _rows(model_file, model_file.tensors[span.name])
    out = _from_f32(_to_f32(raw[span.start : span.stop], span.src), span.dst, span.im_row)
    write_at(output_fd, out, span.offset)
    model_file.release_pages(span.name, (span.start * raw.shape[1], span.stop * raw.shape[1]))
    return out.nbytes


def write_at(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# --- worker processes ---

# set in the parent just before forking, so workers inherit the open model and the output file
_forked_model: GGUFModelParts | None = None
_forked_output_fd: int | None = None


def _convert_in_worker(span: Span) -> int:
    assert _forked_model is not None and _forked_output_fd is not None
    return convert_span(_forked_model, span, _forked_output_fd)


@contextlib.contextmanager
def _converter(model_file: GGUFModelParts, output_fd: int,
               n_workers: int) -> Iterator[Callable[[Iterable[Span]], Iterator[int]]]:
    """A function converting spans into the output, yielding their sizes in order: in this process,
    or on `n_workers` forked ones."""
    global _forked_model, _forked_output_fd
    if n_workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield lambda spans: (convert_span(model_file, span, output_fd) for span in spans)
        return
    _forked_model, _forked_output_fd = model_file, output_fd
    try:
        with Workers(_convert_in_worker, n_workers) as workers:
            yield workers.map
    finally:
        _forked_model = _forked_output_fd = None


# --- the imatrix ---


# An imatrix row (one matrix's weights) whose largest value lies outside this range under- or overflows the
# float32 sums of llama.cpp's weighted searches (`make_qx_quants` squares Σ w·x·l): the tensor comes out as zeros
# (llama-quantize writes it so). The weighting only matters up to a common factor, so such a row is rescaled
# to a largest value of 1: its ratios, what the imatrix says, are kept.
USABLE_IMATRIX_MAX = (1e-20, 1e12)


def imatrix_values(imatrix: ImportanceMatrix, include: Sequence[str], exclude: Sequence[str],
                   source: str | None = None, strict: bool = False) -> dict[str, np.ndarray]:
    """Per-tensor weights `[n_mat, n_cols]` = Σx²/count, filtered as llama-quantize's flags filter them.

    A matrix that saw no tokens gets weights 1 (llama-quantize's load_imatrix), not 0. A row that would make
    the quantizer write zeros (`usable_rows`) is mended with a warning, or refused with `strict`.
    """
    if include and exclude:
        raise ImatrixError("--include-weights and --exclude-weights cannot be used together")
    values: dict[str, np.ndarray] = {}
    for name in imatrix.names():
        if any(part in name for part in exclude):
            continue
        if include and not any(part in name for part in include):
            continue
        stats = imatrix[name]
        means = stats.mean_sq()
        means[stats.counts <= 0] = 1.0
        values[name] = usable_rows(means, f"{source or 'the imatrix'}: entry {shown(name)}", strict)
    return values


def usable_rows(means: np.ndarray, what: str, strict: bool = False) -> np.ndarray:
    """`means [n_mat, n_cols]` with each degenerate row mended: all zero (no information: weights 1, the
    unweighted search), or with a largest value outside `USABLE_IMATRIX_MAX` (rescaled to a largest value
    of 1). Non-finite or negative weights are refused: they cannot come from sums of squares."""
    if not np.isfinite(means).all() or (means < 0).any():
        raise ImatrixError(f"{what} contains non-finite or negative values")
    largest = means.max(axis=1)
    low, high = USABLE_IMATRIX_MAX
    degenerate = (largest < low) | (largest > high)
    if not degenerate.any():
        return means
    rows = ", ".join(str(row) for row in np.flatnonzero(degenerate)[:8])
    problem = (f"{what}: {int(degenerate.sum())} of {len(means)} matrices (rows {rows}) have weights that would "
               f"quantize the tensor to zeros (largest weight outside {low:g}..{high:g})")
    if strict:
        raise ImatrixError(problem)
    warnings.warn(f"{problem}: zero rows use no weighting, the others are rescaled", stacklevel=3)
    mended = means.astype(np.float64)
    for row in np.flatnonzero(degenerate):
        mended[row] = 1.0 if largest[row] == 0 else mended[row] / largest[row]
    return mended.astype(np.float32)


def load_imatrix_file(path: str | Path, log: Log) -> ImportanceMatrix:
    """llama-quantize's `load_imatrix`: a GGUF imatrix must carry imatrix.datasets, imatrix.chunk_count and
    imatrix.chunk_size (one without them is refused); a legacy .dat file needs none."""
    source = Path(path)
    if source.is_file() and is_gguf(source):
        present = GGUFModelFile(source).fields
        missing = [key for key in IMATRIX_METADATA if key not in present]
        if missing:
            raise ImatrixError(f"{source}: missing imatrix metadata ({', '.join(missing)}): llama-quantize refuses "
                               "an imatrix without it")
    matrix = load_imatrix(source)
    if matrix.datasets:
        log("load_imatrix: imatrix datasets=[" + ", ".join(f"'{name}'" for name in matrix.datasets) + "]")
    log(f"load_imatrix: loaded {len(matrix)} importance matrix entries from {path} computed on "
        f"{matrix.chunk_count} chunks")
    return matrix


IMATRIX_METADATA = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


def _imatrix_for(
    path: Path, name: str, source_name: str, ne: Sequence[int], values: dict[str, np.ndarray]
) -> np.ndarray | None:
    """The imatrix rows `[n_mat, n_cols]` of tensor `name` (stored as `source_name` in the input and the imatrix)."""
    means = values.get(source_name)
    if means is None:
        return None
    n_mat = int(ne[2]) if len(ne) > 2 else 1
    if means.size != int(ne[0]) * n_mat:
        if category(name) == Cat.TOKEN_EMBD:
            return None  # llama.cpp ignores a mismatched token_embd entry
        raise ImatrixError(
            f"{path}: imatrix size {means.size} is different from tensor size {int(ne[0]) * n_mat} for {name}"
        )
    return means.reshape(n_mat, int(ne[0]))


def _c_string(text: str) -> bytes:
    """`strncpy(buffer, text, 127)`: the first 127 bytes (a character cut in two stays cut, as in C)."""
    return os.fsencode(text)[:MAX_KV_STRING]


def _imatrix_keys(imatrix: ImportanceMatrix, values: dict[str, np.ndarray], imatrix_file: str | None) -> list[Key]:
    keys: list[Key] = [("quantize.imatrix.file", _c_string(imatrix_file or ""), VT.STRING, None)]
    if imatrix.datasets:
        keys.append(("quantize.imatrix.dataset", _c_string(imatrix.datasets[0]), VT.STRING, None))
    keys.append(("quantize.imatrix.entries_count", len(values), VT.UINT32, None))
    if imatrix.chunk_count > 0:
        keys.append(("quantize.imatrix.chunks_count", int(imatrix.chunk_count), VT.UINT32, None))
    return keys


# --- metadata ---

Key = tuple[str, Any, VT, "VT | None"]  # key, value, GGUF type, item type of an array


def _set(kv: dict[str, Key], key: str, value: Any, vtype: VT, item_type: VT | None = None) -> None:
    """gguf_set_val_*: an existing key is removed, and the key is appended."""
    kv.pop(key, None)
    kv[key] = (key, value, vtype, item_type)


def _output_metadata(model_file: GGUFModelParts, file_type: int, overrides: Sequence[KvOverride],
                     imatrix_keys: Sequence[Key], block_count: int | None) -> dict[str, Key]:
    """The first output file's metadata, in llama-quantize's order (split keys come last, per file)."""
    kv: dict[str, Key] = {}
    for name, stored in model_file.fields.items():
        if name in SPLIT_KEYS or (stored.value_type == VT.ARRAY and not stored.value):
            continue
        kv[name] = (name, stored.value, stored.value_type, stored.item_type)
    _set(kv, "general.quantization_version", GGML_QNT_VERSION, VT.UINT32)
    _set(kv, "general.file_type", file_type, VT.UINT32)
    for override in overrides:  # the user's --override-kv, then the imatrix's keys, in that order
        _set(kv, override.key, *override.stored())
    for key in imatrix_keys:
        _set(kv, *key)
    if block_count is not None:
        _set(kv, f"{model_file.get('general.architecture')}.block_count", block_count, VT.UINT32)
    return kv


def _facts_metadata(model_file: GGUFModelParts, overrides: Sequence[KvOverride]) -> dict[str, object]:
    """The metadata the mixes read, with --override-kv applied where llama.cpp's loader applies it: to
    a key it reads as the override's kind (or a key the file lacks)."""
    metadata = dict(model_file.metadata)
    for override in overrides:
        stored = model_file.fields.get(override.key)
        if stored is None or _override_kind(stored.value_type) == override.kind:
            metadata[override.key] = override.value
    return metadata


def _override_kind(vtype: VT) -> str:
    """The --override-kv kind that llama.cpp's loader accepts for a key stored as `vtype`."""
    return OVERRIDE_KINDS.get(vtype, "int")


OVERRIDE_KINDS = {VT.FLOAT32: "float", VT.FLOAT64: "float", VT.BOOL: "bool", VT.STRING: "str", VT.ARRAY: "array"}


def _copy_file_type(model_file: GGUFModelParts, metadata: dict[str, object]) -> int:
    """COPY's general.file_type: the input's, or what llama.cpp's loader guesses from the most common
    tensor type (marked as guessed)."""
    stated = metadata.get("general.file_type")
    if isinstance(stated, int):
        return stated
    counts: dict[enum.IntEnum, int] = {}
    most, most_type = 0, QType.F32
    for name in llama_order(model_file.tensors):
        qtype = model_file.tensors[name].tensor_type
        counts[qtype] = counts.get(qtype, 0) + 1
        if counts[qtype] > most:
            most, most_type = counts[qtype], qtype
    guessed = GUESSED_FILE_TYPES.get(most_type.name, 0)
    return guessed | LLAMA_FTYPE_GUESSED


# llama_model_loader: the file type named after a model's most common tensor type
GUESSED_FILE_TYPES = {
    "F32": 0, "F16": 1, "BF16": 32, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7, "Q2_K": 10, "Q3_K": 12,
    "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "TQ1_0": 36, "TQ2_0": 37, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28,
    "IQ3_XXS": 23, "IQ1_S": 24, "IQ1_M": 31, "IQ4_NL": 25, "IQ4_XS": 30, "IQ3_S": 26, "NVFP4": 39, "Q1_0": 40,
    "Q2_0": 41,
}


# --- --prune-layers ---

_LAYER = re.compile(r"blk\.(\d+)\.")


def prune_names(names: Sequence[str], prune: Sequence[int]) -> tuple[dict[str, str], int | None]:
    """Output name of every kept tensor (`names` in loader order) and the new block count, as llama.cpp's
    `remap_layer` renumbers the layers left after pruning; (identity, None) without --prune-layers."""
    if not prune:
        return {name: name for name in names}, None
    first_pruned, mapped, next_id = min(prune), {}, 0
    kept = {}
    for name in names:
        match = _LAYER.search(name)
        if match is None:
            kept[name] = name
            continue
        block = int(match.group(1))
        if block not in mapped:
            if block in prune:
                mapped[block] = None
            elif block < first_pruned:
                mapped[block], next_id = block, block + 1
            else:
                mapped[block], next_id = next_id, next_id + 1
        if mapped[block] is not None:
            kept[name] = name[: match.start(1)] + str(mapped[block]) + name[match.end(1) :]
    return kept, next_id


# --- the plan ---


@dataclass
class _Job:
    tensor: TensorInfo  # in the input (its original name)
    name: str  # in the output
    ne: tuple[int, ...]
    src: enum.IntEnum
    dst: enum.IntEnum
    imatrix_rows: np.ndarray | None
    part: int  # the output file it goes to (--keep-split: the input part it came from)
    needs_imatrix: bool = False


@dataclass
class _Plan:
    jobs: list[_Job]
    fallbacks: list[str]
    overrides: list[str]
    n_parts: int
    block_count: int | None  # after --prune-layers


def _plan(model_file: GGUFModelParts, ft: FileType, overrides: Overrides, values: dict[str, np.ndarray],
          options: QuantizeOptions, facts: dict[str, object]) -> _Plan:
    """Every kept tensor's output name, type and file, in the order llama-quantize decides and writes them."""
    kept, block_count = prune_names(llama_order(model_file.tensors), options.prune_layers)
    source = {out: model_file.tensors[name] for name, out in kept.items()}
    order = list(source)
    if options.keep_split:  # llama.cpp sorts by input part, then by place in it, and decides in that order
        order.sort(key=lambda out: (model_file.part_of[source[out].name], source[out].offset))
    specs = [(out, list(source[out].ne), source[out].tensor_type) for out in order]
    chosen, state = plan_types(ft, specs, facts, overrides, has_imatrix=bool(values),
                               leave_output_tensor=options.leave_output_tensor, order=order)
    arch = str(facts.get("general.architecture", ""))
    jobs = []
    for out in order:
        tensor = source[out]
        part = model_file.part_of[tensor.name] if options.keep_split else 0
        job = _Job(tensor, out, tensor.ne, tensor.tensor_type, chosen[out], None, part)
        job.needs_imatrix = (not overrides.only_copy and requires_imatrix(out, job.dst, ft)
                             and allows_quantization(out, tensor.ne, options.leave_output_tensor, arch))
        jobs.append(job)
    n_parts = 1 + max((job.part for job in jobs), default=0)
    return _Plan(jobs, state.fallback_notes, state.override_notes, n_parts, block_count)


def _check_plan(path: Path, plan: _Plan, values: dict[str, np.ndarray], options: QuantizeOptions) -> None:
    """What llama-quantize refuses, refused before anything is written (it finds some of it mid-file)."""
    if not values:
        needing = next((job for job in plan.jobs if job.needs_imatrix), None)
        if needing is not None:
            raise ImatrixError(f"this quantization requires an imatrix! (offending tensor: {needing.name}, target "
                               f"type: {type_name(needing.dst)}; llama.cpp refuses the 1-3 bit i-quants and Q2_K_S "
                               "without one)")
    for job in plan.jobs:
        if job.src == job.dst:
            continue
        _check_convertible(path, job.name, job.src, job.dst, options.allow_requantize)
        job.imatrix_rows = _imatrix_for(path, job.name, job.tensor.name, job.ne, values)
        if job.imatrix_rows is None and job.needs_imatrix:
            raise ImatrixError(f"missing importance matrix for tensor {job.name} in a very low-bit quantization "
                               f"({type_name(job.dst)}): the result would be garbage")


def _dry_run_plan(plan: _Plan, path: Path, values: dict[str, np.ndarray]) -> None:
    """Imatrix rows for the report (`used_imatrix`), without the checks that would stop a real run."""
    for job in plan.jobs:
        if job.src != job.dst:
            with contextlib.suppress(ImatrixError):
                job.imatrix_rows = _imatrix_for(path, job.name, job.tensor.name, job.ne, values)


def _shape_text(ne: Sequence[int]) -> str:
    dims = [*ne, *([1] * (4 - len(ne)))]
    return ", ".join(f"{n:6d}" for n in dims)


# --- the output files ---


def output_files(output_path: Path, n_parts: int, keep_split: bool) -> list[Path]:
    """The file(s) written: `output_path`, or with --keep-split `<prefix>-0000i-of-0000n.gguf` for every part
    (even one), the prefix being the output without its `.gguf` (llama-quantize drops the last 5 characters
    of a name that contains `.gguf`)."""
    if not keep_split:
        return [output_path]
    prefix = str(output_path)
    if ".gguf" in prefix:
        prefix = prefix[: -len(".gguf")]
    return [split_path(prefix, index, n_parts) for index in range(n_parts)]


def _write_header(tmp: Path, kv: Iterable[Key], alignment: int | None, jobs: Sequence[_Job]) -> list[int]:
    """Write the header, metadata and tensor infos, size the file to its final length (zero padding
    included, as gguf-py pads), and return where each tensor's data goes."""
    writer = ModelWriter(tmp, "")
    writer.kv_data[0].clear()  # the keys come in `kv`'s order, general.architecture included
    for key, value, vtype, item_type in kv:
        writer.add_key_value(key, value, vtype, sub_type=item_type)
    if alignment is not None:
        writer.data_alignment = alignment
    sizes = [row_bytes(job.dst, job.ne[0]) * _n_rows(job.ne) for job in jobs]
    for job, size in zip(jobs, sizes, strict=True):
        writer.add_tensor_info(job.name, tuple(reversed(job.ne)), np.dtype(np.float32), size,
                               raw_dtype=job.dst)  # type: ignore[arg-type]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    align = writer.data_alignment
    offset = gguf.GGUFWriter.ggml_pad(writer.fout[0].tell(), align)
    writer.close()
    offsets = []
    for size in sizes:
        offsets.append(offset)
        offset += gguf.GGUFWriter.ggml_pad(size, align)
    if tmp.is_file():  # the whole file's size, padding included (not for a device: -o /dev/null)
        os.truncate(tmp, offset)
    return offsets


def _split_keys(index: int, n_parts: int, n_tensors: int) -> list[Key]:
    return [("split.no", index, VT.UINT16, None), ("split.count", n_parts, VT.UINT16, None),
            ("split.tensors.count", n_tensors, VT.INT32, None)]


# --- the driver ---


def quantize_model(
    input_path: str | Path,
    output_path: str | Path | None,
    ftype: str,
    imatrix: ImportanceMatrix | str | Path | None = None,
    options: QuantizeOptions | None = None,
    *,
    log: Log | None = None,
    imatrix_file: str | None = None,
    **flags: Any,
) -> QuantizeReport:
    """Quantize a GGUF model to file type `ftype` (`Q4_K_M`, `IQ4_XS`, `COPY`, ...) as llama-quantize does.

    `imatrix`: the importance matrix, or its file (read, and refused without its metadata, as
    llama-quantize does). `options` holds llama-quantize's flags; any of its fields may also be given as
    a keyword (`pure=True`). `imatrix_file` (= `options.imatrix`) is the name recorded in
    `quantize.imatrix.file`. `log` receives llama-quantize's progress lines (nothing is printed without it).
    Imatrix rows that would quantize a tensor to zeros are mended with a warning (`usable_rows`), or refused
    with `strict_imatrix`. `output_path` may be None for a dry run.
    """
    started = time.perf_counter()
    emit: Log = log or (lambda _line: None)
    options, imatrix = _resolved(options, flags, imatrix, imatrix_file)
    src_path, dst_path = Path(input_path), None if output_path is None else Path(output_path)
    if dst_path is None and not options.dry_run:
        raise ImatrixError("quantize: no output file given")
    ft = parse_file_type(ftype)
    kv_overrides = [parse_override_kv(text) for text in options.override_kv]
    overrides = Overrides(_as_type(options.output_tensor_type), _as_type(options.token_embedding_type), options.pure,
                          tensor_type_patterns(options.tensor_type), only_copy=ft.name == "COPY")
    if imatrix is None and options.imatrix:
        imatrix = load_imatrix_file(options.imatrix, emit)
    model_file = open_model(src_path)
    values = _check_imatrix(src_path, model_file, imatrix, options)
    if values:
        emit(f"prepare_imatrix: have {len(values)} importance matrix entries")
    facts = _facts_metadata(model_file, kv_overrides)
    file_type = _copy_file_type(model_file, facts) if overrides.only_copy else int(ft.ftype)
    plan = _plan(model_file, ft, overrides, values, options, facts)
    if options.dry_run:
        _dry_run_plan(plan, src_path, values)
    else:
        _check_plan(src_path, plan, values, options)
    report = QuantizeReport(src_path, dst_path, ft.name, file_type, fallbacks=plan.fallbacks, overrides=plan.overrides,
                            needs_imatrix=any(job.needs_imatrix for job in plan.jobs), with_imatrix=bool(values),
                            dry_run=options.dry_run)
    for note in [*plan.overrides, *plan.fallbacks]:
        emit(note)
    if values:
        emit(f"quantize_model: have importance matrix data with {len(values)} entries")
    extra = _imatrix_keys(imatrix, values, options.imatrix) if imatrix is not None and values else []
    kv = _output_metadata(model_file, file_type, kv_overrides, extra, plan.block_count)
    if options.dry_run:
        report.tensors = [_dry_run_one(job, index, len(model_file.tensors), emit)
                          for index, job in enumerate(plan.jobs, 1)]
    else:
        assert dst_path is not None
        report.output_paths = _checked_outputs(dst_path, plan, src_path, options)
        report.output_path = report.output_paths[0]
        _write_parts(model_file, plan, kv, report, options, emit)
    if imatrix is not None:
        report.missing_imatrix = [t.name for t in report.tensors if t.quantized and not t.used_imatrix]
    report.seconds = time.perf_counter() - started
    _summarize(report, emit)
    return report


def _resolved(options: QuantizeOptions | None, flags: dict[str, Any], imatrix: ImportanceMatrix | str | Path | None,
              imatrix_file: str | None) -> tuple[QuantizeOptions, ImportanceMatrix | None]:
    """The options with the keyword flags folded in, and the matrix (None when only its file is named)."""
    options = dataclasses.replace(options or QuantizeOptions(), **flags)
    for repeatable in ("include_weights", "exclude_weights", "tensor_type", "override_kv"):
        if isinstance(getattr(options, repeatable), str):  # one text where a flag's list was meant
            options = dataclasses.replace(options, **{repeatable: (getattr(options, repeatable),)})
    if options.max_buffer_size < 1:
        raise ImatrixError(f"invalid --max-buffer-size '{options.max_buffer_size}'")
    if imatrix_file is not None:
        options = dataclasses.replace(options, imatrix=imatrix_file)
    if isinstance(imatrix, (str, Path)):
        return dataclasses.replace(options, imatrix=options.imatrix or str(imatrix)), None
    return options, imatrix


def _checked_outputs(dst_path: Path, plan: _Plan, src_path: Path, options: QuantizeOptions) -> list[Path]:
    """The file(s) to write, each checked writable and none of them an input."""
    paths = output_files(dst_path, plan.n_parts, options.keep_split)
    for path in paths:
        check_not_an_input(path, input_model=src_path, imatrix=options.imatrix)
        check_output_path(path)
    return paths


def _write_parts(model_file: GGUFModelParts, plan: _Plan, kv: dict[str, Key], report: QuantizeReport,
                 options: QuantizeOptions, emit: Log) -> None:
    """Write each output file (one, or one per input part with --keep-split), its header first."""
    threads = options.n_threads if options.n_threads and options.n_threads > 0 else (os.cpu_count() or 1)
    alignment = model_file.get("general.alignment")
    max_buffer = options.max_buffer_size * MIB_BYTES
    total, index = len(model_file.tensors), 0
    for part, path in enumerate(report.output_paths):
        jobs = [job for job in plan.jobs if job.part == part]
        keys = list(kv.values()) if part == 0 else []
        if plan.n_parts > 1:
            keys += _split_keys(part, plan.n_parts, len(plan.jobs))
        with atomic_path(path) as tmp:
            offsets = _write_header(tmp, keys, int(alignment) if part == 0 and alignment else None, jobs)
            spans = [tensor_spans(job, offset, max_buffer) if job.src != job.dst else []
                     for job, offset in zip(jobs, offsets, strict=True)]
            with open(tmp, "r+b") as output, _converter(model_file, output.fileno(), threads) as convert:
                # one ordered stream over every tensor, so that small tensors leave no worker idle
                converted = convert(span for job_spans in spans for span in job_spans)
                for job, job_spans, offset in zip(jobs, spans, offsets, strict=True):
                    written = sum(next(converted) for _ in job_spans)
                    index += 1
                    report.tensors.append(_write_one(output.fileno(), model_file, job, offset, written, index,
                                                     total, max_buffer, emit))
                    # drop the input tensor's pages from our resident set (llama.cpp unmaps each weight too)
                    model_file.release_pages(job.tensor.name)


def _as_type(value: str | enum.IntEnum | None) -> enum.IntEnum | None:
    return parse_tensor_type(value) if isinstance(value, str) else value


def _check_imatrix(
    path: Path, model_file: GGUFModelParts, imatrix: ImportanceMatrix | None, options: QuantizeOptions
) -> dict[str, np.ndarray]:
    include, exclude = options.include_weights, options.exclude_weights
    if imatrix is None:
        if include or exclude:
            raise ImatrixError("--include-weights/--exclude-weights need an imatrix")
        return {}
    names = set(model_file.tensors)
    if not names.intersection(imatrix.names()):
        raise ImatrixError(f"{path}: no tensor of this model is in the imatrix (an imatrix of another model?)")
    return imatrix_values(imatrix, include, exclude, options.imatrix, options.strict_imatrix)


def _head(job: _Job, index: int, total: int) -> str:
    return (f"[{index:4d}/{total:4d}] {job.name:<36} - [{_shape_text(job.ne)}], type = {type_name(job.src):>6}, ")


def _dry_run_one(job: _Job, index: int, total: int, emit: Log) -> TensorReport:
    src_bytes = row_bytes(job.src, job.ne[0]) * _n_rows(job.ne)
    report = TensorReport(job.name, job.ne, job.src, job.dst, src_bytes, src_bytes)
    if not report.quantized:
        emit(_head(job, index, total) + f"size = {src_bytes / MiB:8.3f} MiB")
        return report
    report.dst_bytes = row_bytes(job.dst, job.ne[0]) * _n_rows(job.ne)
    report.used_imatrix = job.imatrix_rows is not None
    emit(_head(job, index, total) + f"size = {src_bytes / MiB:8.2f} MiB -> {report.dst_bytes / MiB:8.2f} MiB "
         f"({type_name(job.dst)})")
    return report


def _write_one(output_fd: int, model_file: GGUFModelParts, job: _Job, offset: int, converted_bytes: int,
               index: int, total: int, max_buffer: int, emit: Log) -> TensorReport:
    """Finish one tensor: copy the input bytes when it keeps its type (its converted spans are
    already in place), and report it as llama-quantize does."""
    raw = _rows(model_file, job.tensor)
    report = TensorReport(job.name, job.ne, job.src, job.dst, raw.nbytes, raw.nbytes)
    if not report.quantized:
        slab = max(1, max_buffer // max(raw.shape[1], 1))  # whole rows, as llama.cpp copies them
        for start in range(0, raw.shape[0], slab):
            write_at(output_fd, raw[start : start + slab], offset + start * raw.shape[1])
        emit(_head(job, index, total) + f"size = {raw.nbytes / MiB:8.3f} MiB")
        return report
    report.dst_bytes = converted_bytes
    report.used_imatrix = job.imatrix_rows is not None
    missing = "" if report.used_imatrix else " (no imatrix data)"
    emit(
        _head(job, index, total) + f"converting to {type_name(job.dst)} .. size = {raw.nbytes / MiB:8.2f} MiB -> "
        f"{converted_bytes / MiB:8.2f} MiB{missing}"
    )
    return report


def _summarize(report: QuantizeReport, emit: Log) -> None:
    emit(f"quantize_model: model size  = {report.src_bytes / MiB:8.2f} MiB ({report.src_bpw:.2f} BPW)")
    emit(f"quantize_model: quant size  = {report.dst_bytes / MiB:8.2f} MiB ({report.dst_bpw:.2f} BPW)")
    if report.dry_run and report.needs_imatrix and not report.with_imatrix:
        emit("quantize_model: WARNING: dry run completed successfully, but actually completing this quantization "
             "will require an imatrix!")
    if report.fallbacks:
        emit(
            f"quantize_model: WARNING: {len(report.fallbacks)} of {len(report.tensors)} tensor(s) "
            "required fallback quantization"
        )
    expected = {Cat.TOKEN_EMBD, Cat.OUTPUT}
    unexpected = [name for name in report.missing_imatrix if category(name) not in expected]
    if unexpected and not report.dry_run:
        warnings.warn(f"no imatrix data for {len(unexpected)} tensor(s): {', '.join(unexpected)}", stacklevel=3)
    emit(f"quantize_model: quantize time = {report.seconds * 1000:8.2f} ms")
