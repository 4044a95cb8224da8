"""Whole-model GGUF quantization: llama-quantize's job, tensor by tensor from the mmapped input.

Metadata is copied as llama.cpp copies it (then `general.quantization_version` and
`general.file_type` are set, and the `quantize.imatrix.*` keys added when an imatrix is used);
tensors are written in llama.cpp's loader order with 32-byte alignment. The header is written
first, which fixes every tensor's place in the file; each tensor's rows are then converted in spans
(on several forked worker processes when asked for more than one thread) and written straight to
their place, so memory stays near a few spans on top of the mapped input.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

import imatrix.quant  # noqa: F401  (registers every kernel)
from imatrix.errors import ImatrixError, shown
from imatrix.formats.atomic import atomic_path, check_not_an_input, check_output_path
from imatrix.ggufio.reader import GGUFModelFile, TensorInfo
from imatrix.ggufio.types import dequantize, type_sizes
from imatrix.ggufio.writer import ModelWriter
from imatrix.matrix import ImportanceMatrix
from imatrix.quant.base import quant_type, quantize_rows
from imatrix.quant.mixes import (
    UNQUANTIZED,
    Cat,
    FileType,
    Overrides,
    category,
    parse_file_type,
    plan_types,
    row_bytes,
    type_name,
)

QType = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType
GGML_QNT_VERSION = 2
MiB = 1024.0 * 1024.0
CHUNK_ELEMENTS = 1 << 18  # rows per work item: about this many values (kernel temporaries scale with it)
DROPPED_KEYS = frozenset(
    {"general.quantization_version", "general.file_type", "split.no", "split.count", "split.tensors.count"}
)
MAX_KV_STRING = 127  # llama-quantize stores the imatrix file and dataset in 128-byte buffers
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
    output_path: Path
    ftype: str
    file_type: int
    tensors: list[TensorReport] = field(default_factory=list)
    missing_imatrix: list[str] = field(default_factory=list)  # quantized without imatrix data
    fallbacks: list[str] = field(default_factory=list)  # llama-quantize's fallback warning lines
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


def open_model(path: Path) -> GGUFModelFile:
    if not path.is_file():
        raise ImatrixError(f"{path}: no such model file")
    model_file = GGUFModelFile(path)
    if model_file.get("general.type") == "imatrix":
        raise ImatrixError(f"{path}: is an importance matrix, not a model (an imatrix goes to --imatrix)")
    model_file.require("general.architecture")  # every model names its architecture
    return model_file


def _n_rows(ne: Sequence[int]) -> int:
    """Rows of a tensor of ggml shape `ne` (every dimension but the row length)."""
    return int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1


def _rows(model_file: GGUFModelFile, tensor: TensorInfo) -> np.ndarray:
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

    name: str
    src: enum.IntEnum
    dst: enum.IntEnum
    start: int
    stop: int
    im_row: np.ndarray | None  # the imatrix row of the matrix (expert) these rows belong to
    offset: int  # where the converted rows go in the output file


def tensor_spans(job: _Job, data_offset: int) -> list[Span]:
    """About CHUNK_ELEMENTS values per span; spans never cross a matrix (expert) boundary, each expert
    having its own imatrix row. `data_offset`: where the tensor's data starts in the output file."""
    n_cols = job.ne[0]
    n_rows = _n_rows(job.ne)
    rows_per_matrix = job.ne[1] if len(job.ne) > 1 else 1
    out_row_bytes = row_bytes(job.dst, n_cols)
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    spans = []
    for first in range(0, n_rows, rows_per_matrix):
        im_row = None if job.imatrix_rows is None else job.imatrix_rows[first // rows_per_matrix]
        for start in range(first, min(first + rows_per_matrix, n_rows), step):
            stop = min(start + step, first + rows_per_matrix, n_rows)
            spans.append(Span(job.tensor.name, job.src, job.dst, start, stop, im_row,
                              data_offset + start * out_row_bytes))
    return spans


def convert_span(model_file: GGUFModelFile, span: Span, output_fd: int) -> int:
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
_forked_model: GGUFModelFile | None = None
_forked_output_fd: int | None = None


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool


def _convert_in_worker(span: Span) -> int:
    assert _forked_model is not None and _forked_output_fd is not None
    return convert_span(_forked_model, span, _forked_output_fd)


@contextlib.contextmanager
def _converter(model_file: GGUFModelFile, output_fd: int,
               n_workers: int) -> Iterator[Callable[[Iterable[Span]], Iterator[int]]]:
    """A function converting spans into the output, yielding their sizes in order: in this process,
    or on `n_workers` forked ones."""
    global _forked_model, _forked_output_fd
    if n_workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield lambda spans: (convert_span(model_file, span, output_fd) for span in spans)
        return
    _forked_model, _forked_output_fd = model_file, output_fd
    try:
        with multiprocessing.get_context("fork").Pool(n_workers, initializer=_worker_init) as pool:
            yield lambda spans: pool.imap(_convert_in_worker, spans)
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


def _imatrix_for(
    path: Path, name: str, ne: Sequence[int], values: dict[str, np.ndarray]
) -> np.ndarray | None:
    means = values.get(name)
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


def _imatrix_keys(
    imatrix: ImportanceMatrix, values: dict[str, np.ndarray], imatrix_file: str | None
) -> list[tuple[str, object, VT]]:
    keys: list[tuple[str, object, VT]] = [("quantize.imatrix.file", (imatrix_file or "")[:MAX_KV_STRING], VT.STRING)]
    if imatrix.datasets:
        keys.append(("quantize.imatrix.dataset", imatrix.datasets[0][:MAX_KV_STRING], VT.STRING))
    keys.append(("quantize.imatrix.entries_count", len(values), VT.UINT32))
    if imatrix.chunk_count > 0:
        keys.append(("quantize.imatrix.chunks_count", int(imatrix.chunk_count), VT.UINT32))
    return keys


# --- the driver ---


@dataclass
class _Job:
    tensor: TensorInfo
    ne: tuple[int, ...]
    src: enum.IntEnum
    dst: enum.IntEnum
    imatrix_rows: np.ndarray | None


def _plan(
    path: Path,
    model_file: GGUFModelFile,
    ft: FileType,
    overrides: Overrides,
    values: dict[str, np.ndarray],
    leave_output_tensor: bool,
    allow_requantize: bool,
) -> tuple[list[_Job], list[str]]:
    by_name = model_file.tensors
    specs = [(t.name, list(t.ne), t.tensor_type) for t in by_name.values()]
    chosen, state = plan_types(
        ft, specs, model_file.metadata, overrides, has_imatrix=bool(values),
        leave_output_tensor=leave_output_tensor,
    )
    jobs = []
    for name, dst in chosen.items():
        tensor = by_name[name]
        ne = tensor.ne
        src = tensor.tensor_type
        rows = None
        if src != dst:
            _check_convertible(path, name, src, dst, allow_requantize)
            rows = _imatrix_for(path, name, ne, values)
        jobs.append(_Job(tensor, ne, src, dst, rows))
    return jobs, state.fallback_notes


def _shape_text(ne: Sequence[int]) -> str:
    dims = [*ne, *([1] * (4 - len(ne)))]
    return ", ".join(f"{n:6d}" for n in dims)


def _write_header(tmp: Path, model_file: GGUFModelFile, ft: FileType, extra: Iterable[tuple[str, object, VT]],
                  jobs: Sequence[_Job]) -> list[int]:
    """Write the header, metadata and tensor infos, size the file to its final length (zero padding
    included, as gguf-py pads), and return where each tensor's data goes."""
    writer = ModelWriter(tmp, str(model_file.get("general.architecture", "")))
    writer.kv_data[0].clear()  # keep the input's key order, general.architecture included
    for name, stored in model_file.fields.items():
        if name in DROPPED_KEYS or (stored.value_type == VT.ARRAY and not stored.value):
            continue
        writer.add_key_value(name, stored.value, stored.value_type, sub_type=stored.item_type)
    if "general.alignment" in model_file.metadata:
        writer.data_alignment = int(model_file.metadata["general.alignment"])
    writer.add_key_value("general.quantization_version", GGML_QNT_VERSION, VT.UINT32)
    writer.add_key_value("general.file_type", int(ft.ftype), VT.UINT32)
    for key, value, vtype in extra:
        writer.add_key_value(key, value, vtype)
    sizes = [row_bytes(job.dst, job.ne[0]) * _n_rows(job.ne) for job in jobs]
    for job, size in zip(jobs, sizes, strict=True):
        writer.add_tensor_info(job.tensor.name, tuple(reversed(job.ne)), np.dtype(np.float32), size,
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


def quantize_model(
    input_path: str | Path,
    output_path: str | Path,
    ftype: str,
    imatrix: ImportanceMatrix | None = None,
    include_weights: Sequence[str] = (),
    exclude_weights: Sequence[str] = (),
    output_tensor_type: str | enum.IntEnum | None = None,
    token_embedding_type: str | enum.IntEnum | None = None,
    allow_requantize: bool = False,
    pure: bool = False,
    leave_output_tensor: bool = False,
    n_threads: int | None = None,
    imatrix_file: str | None = None,
    log: Log | None = None,
    strict_imatrix: bool = False,
) -> QuantizeReport:
    """Quantize a GGUF model to file type `ftype` (`Q4_K_M`, `IQ4_XS`, ...) as llama-quantize does.

    `imatrix_file` is only recorded in the output's `quantize.imatrix.file`; `log` receives
    llama-quantize's progress lines (nothing is printed without it). Imatrix rows that would quantize a
    tensor to zeros are mended with a warning (`usable_rows`), or refused with `strict_imatrix`.
    """
    started = time.perf_counter()
    emit: Log = log or (lambda _line: None)
    src_path, dst_path = Path(input_path), Path(output_path)
    ft = parse_file_type(ftype)
    overrides = Overrides(_as_type(output_tensor_type), _as_type(token_embedding_type), pure)
    check_not_an_input(dst_path, input_model=src_path, imatrix=imatrix_file)
    check_output_path(dst_path)
    model_file = open_model(src_path)
    values = _check_imatrix(src_path, model_file, imatrix, include_weights, exclude_weights, imatrix_file,
                            strict_imatrix)
    jobs, fallbacks = _plan(src_path, model_file, ft, overrides, values, leave_output_tensor, allow_requantize)
    report = QuantizeReport(src_path, dst_path, ft.name, int(ft.ftype), fallbacks=fallbacks)
    for note in fallbacks:
        emit(note)
    if values:
        emit(f"quantize_model: have importance matrix data with {len(values)} entries")
    extra = _imatrix_keys(imatrix, values, imatrix_file) if imatrix is not None and values else []
    threads = n_threads if n_threads and n_threads > 0 else (os.cpu_count() or 1)
    with atomic_path(dst_path) as tmp:
        offsets = _write_header(tmp, model_file, ft, extra, jobs)
        spans = [tensor_spans(job, offset) if job.src != job.dst else []
                 for job, offset in zip(jobs, offsets, strict=True)]
        with open(tmp, "r+b") as output, _converter(model_file, output.fileno(), threads) as convert:
            # one ordered stream over every tensor, so that small tensors leave no worker idle
            converted = convert(span for job_spans in spans for span in job_spans)
            for index, (job, job_spans, offset) in enumerate(zip(jobs, spans, offsets, strict=True), 1):
                written = sum(next(converted) for _ in job_spans)
                report.tensors.append(_write_one(output.fileno(), model_file, job, offset, written, index,
                                                 len(jobs), emit))
                # drop the input tensor's pages from our resident set (llama.cpp unmaps each weight too)
                model_file.release_pages(job.tensor.name)
    if imatrix is not None:
        report.missing_imatrix = [t.name for t in report.tensors if t.quantized and not t.used_imatrix]
    report.seconds = time.perf_counter() - started
    _summarize(report, emit)
    return report


def _as_type(value: str | enum.IntEnum | None) -> enum.IntEnum | None:
    from imatrix.quant.mixes import parse_tensor_type

    return parse_tensor_type(value) if isinstance(value, str) else value


def _check_imatrix(
    path: Path,
    model_file: GGUFModelFile,
    imatrix: ImportanceMatrix | None,
    include: Sequence[str],
    exclude: Sequence[str],
    imatrix_file: str | None,
    strict: bool,
) -> dict[str, np.ndarray]:
    if imatrix is None:
        if include or exclude:
            raise ImatrixError("--include-weights/--exclude-weights need an imatrix")
        return {}
    names = set(model_file.tensors)
    if not names.intersection(imatrix.names()):
        raise ImatrixError(f"{path}: no tensor of this model is in the imatrix (an imatrix of another model?)")
    return imatrix_values(imatrix, include, exclude, imatrix_file, strict)


def _write_one(output_fd: int, model_file: GGUFModelFile, job: _Job, offset: int, converted_bytes: int,
               index: int, total: int, emit: Log) -> TensorReport:
    """Finish one tensor: copy the input bytes when it keeps its type (its converted spans are
    already in place), and report it as llama-quantize does."""
    raw = _rows(model_file, job.tensor)
    head = f"[{index:4d}/{total:4d}] {job.tensor.name:>36} - [{_shape_text(job.ne)}], type = {type_name(job.src):>6}, "
    report = TensorReport(job.tensor.name, job.ne, job.src, job.dst, raw.nbytes, raw.nbytes)
    if not report.quantized:
        write_at(output_fd, raw, offset)
        emit(head + f"size = {raw.nbytes / MiB:8.3f} MiB")
        return report
    report.dst_bytes = converted_bytes
    report.used_imatrix = job.imatrix_rows is not None
    missing = "" if report.used_imatrix else " (no imatrix data)"
    emit(
        head + f"converting to {type_name(job.dst)} .. size = {raw.nbytes / MiB:8.2f} MiB -> "
        f"{converted_bytes / MiB:8.2f} MiB{missing}"
    )
    return report


def _summarize(report: QuantizeReport, emit: Log) -> None:
    emit(f"quantize_model: model size  = {report.src_bytes / MiB:8.2f} MiB ({report.src_bpw:.2f} BPW)")
    emit(f"quantize_model: quant size  = {report.dst_bytes / MiB:8.2f} MiB ({report.dst_bpw:.2f} BPW)")
    if report.fallbacks:
        emit(
            f"quantize_model: WARNING: {len(report.fallbacks)} of {len(report.tensors)} tensor(s) "
            "required fallback quantization"
        )
    expected = {Cat.TOKEN_EMBD, Cat.OUTPUT}
    unexpected = [name for name in report.missing_imatrix if category(name) not in expected]
    if unexpected:
        warnings.warn(f"no imatrix data for {len(unexpected)} tensor(s): {', '.join(unexpected)}", stacklevel=3)
    emit(f"quantize_model: quantize time = {report.seconds * 1000:8.2f} ms")
