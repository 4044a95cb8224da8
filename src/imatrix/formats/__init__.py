"""Translate `ImportanceMatrix` to and from files: GGUF (current) and `.dat` (legacy).

`load_imatrix`, `load_imatrices` and `save_imatrix` are also `imatrix.load`, `imatrix.load_many` and
`imatrix.save`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from imatrix.errors import ImatrixError
from imatrix.formats.atomic import atomic_path
from imatrix.formats.dat_file import read_dat_imatrix, write_dat_imatrix
from imatrix.formats.gguf_file import read_gguf_imatrix, write_gguf_imatrix
from imatrix.ggufio.reader import is_gguf
from imatrix.matrix import ImportanceMatrix
from imatrix.reporter import OUTPUT, SILENT, Reporter

__all__ = ["atomic_path", "is_gguf", "load_imatrices", "load_imatrix", "partial_data_warnings", "save_imatrix"]


def load_imatrix(path: str | Path, chunk_size: int = 512) -> ImportanceMatrix:
    """Read a GGUF or legacy `.dat` imatrix; `.dat` values become raw sums via `chunk_size`."""
    source = Path(path)
    if source.is_dir():
        raise ImatrixError(f"{source}: is a directory, not an imatrix file")
    if not source.is_file():
        raise ImatrixError(f"{source}: no such imatrix file")
    try:
        if is_gguf(source):
            return read_gguf_imatrix(source)
        return read_dat_imatrix(source, chunk_size)
    except OSError as exc:
        raise ImatrixError(f"{source}: cannot read: {exc.strerror}") from exc


def load_imatrices(paths: Iterable[str | Path], chunk_size: int = 512) -> ImportanceMatrix:
    """Read and merge several files in order, as `--in-file a,b` does (chunk_count recomputed, as llama.cpp
    does after loading; the merge holds no single run's `run_keys`)."""
    merged = ImportanceMatrix(chunk_size=chunk_size)
    for path in paths:
        incoming = load_imatrix(path, chunk_size=chunk_size)
        try:
            merged.merge_in(incoming)
        except ImatrixError as exc:
            raise ImatrixError(f"{path}: {exc}") from None
    merged.chunk_size = chunk_size
    merged.update_chunk_count()
    return merged


def save_imatrix(matrix: ImportanceMatrix, path: str | Path, output_format: str | None = None,
                 reporter: Reporter = SILENT) -> Path:
    """Write atomically as GGUF or legacy `.dat` (`output_format`; None: by the suffix, GGUF but for `.dat`).
    llama.cpp's warning for expert stacks with experts that got no rows goes to `reporter`."""
    target = Path(path)
    if not len(matrix):
        raise ImatrixError(f"{target}: nothing to save: the imatrix holds no tensors")
    fmt = (output_format or ("dat" if target.suffix == ".dat" else "gguf")).lower()
    if fmt == "dat":
        write_dat_imatrix(matrix, target)
    elif fmt == "gguf":
        write_gguf_imatrix(matrix, target)
    else:
        raise ImatrixError(f"unknown output format '{output_format}' (expected gguf or dat)")
    for warning in partial_data_warnings(matrix):
        reporter.log(warning, OUTPUT)
    return target


def partial_data_warnings(matrix: ImportanceMatrix) -> list[str]:
    """llama.cpp's `save_imatrix` warning for expert stacks where some experts got no rows."""
    warnings = []
    for name in matrix.names():
        counts = matrix[name].counts
        n_zeros = int((counts == 0).sum())
        if n_zeros > 0:
            share = 100.0 * (counts.size - n_zeros) / counts.size
            warnings.append(f"save_imatrix: entry '{name:>40}' has partial data ({share:.2f}%)")
    return warnings
