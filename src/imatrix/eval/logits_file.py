"""The base log-probability file of `--kl-divergence-base`, in llama-perplexity's own layout.

Both tools read each other's files. All numbers are little-endian:

    "_logits_"                                   8 bytes
    n_ctx, n_vocab, n_chunk                      3 × int32
    tokens                                       int32 [n_chunk · n_ctx], as tokenized (no BOS swap)
    per chunk, per scored position (n_ctx − 1 − n_ctx/2 of them, predicting token first+1 … n_ctx−1):
        scale, min_log_prob                      2 × float32
        q                                        uint16 [n_vocab], padded with zeros to an even count

A log-probability is `scale · q + min_log_prob`; logits more than 16 below the maximum all get
q = 0 (the rows are made by `metrics.log_softmax_u16`, read by `metrics.u16_log_probs`).
SmolLM2 (49,152 tokens) takes 98 KiB per position: 10 chunks of 512 are about 250 MB.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imatrix.errors import ImatrixError
from imatrix.formats.atomic import atomic_path
from imatrix.metrics import u16_row_width

MAGIC = b"_logits_"
_HEADER = struct.Struct("<iii")
HEADER_BYTES = len(MAGIC) + _HEADER.size
row_width = u16_row_width  # uint16 values per scored position


def n_scored(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


@dataclass(frozen=True)
class LogitsHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def width(self) -> int:
        return row_width(self.n_vocab)

    @property
    def chunk_bytes(self) -> int:
        return n_scored(self.n_ctx) * self.width * 2

    @property
    def data_offset(self) -> int:
        return HEADER_BYTES + 4 * self.n_chunk * self.n_ctx

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.n_chunk * self.chunk_bytes


class LogitsWriter:
    """Streams a base file chunk by chunk (`with LogitsWriter(...) as w: w.write_chunk(rows)`).

    The file appears in one rename once every chunk is written; an error or a short run leaves none.
    """

    def __init__(self, path: str | Path, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> None:
        self.path = Path(path)
        self.tokens = np.asarray(tokens, dtype="<i4").ravel()
        self.header = LogitsHeader(n_ctx, n_vocab, self.tokens.size // n_ctx)
        self._stack = contextlib.ExitStack()
        self._written = 0

    def __enter__(self) -> LogitsWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            self._handle = self._stack.enter_context(open(tmp, "wb"))
        except OSError as exc:
            self._stack.close()
            raise ImatrixError(f"{self.path}: cannot write: {exc.strerror}") from exc
        header = self.header
        self._handle.write(MAGIC + _HEADER.pack(header.n_ctx, header.n_vocab, header.n_chunk))
        self._handle.write(self.tokens.tobytes())
        return self

    def write_chunk(self, rows: np.ndarray) -> None:
        if rows.shape != (n_scored(self.header.n_ctx), self.header.width):
            raise ValueError(f"chunk rows have shape {rows.shape}")
        self._handle.write(rows.astype("<u2", copy=False).tobytes())
        self._written += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc_type is None and self._written != self.header.n_chunk:
            short = ImatrixError(f"{self.path}: only {self._written} of {self.header.n_chunk} chunks written")
            self._stack.__exit__(ImatrixError, short, None)
            raise short
        return bool(self._stack.__exit__(exc_type, exc, tb))


class LogitsFile:
    """A base file opened for reading: header checked, tokens in memory, log-probs mmapped per chunk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header = self._read_header()
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        tokens = data[HEADER_BYTES : self.header.data_offset].view("<i4")
        self.tokens = np.asarray(tokens, dtype=np.int64).reshape(self.header.n_chunk, self.header.n_ctx)
        self._data = data

    def _read_header(self) -> LogitsHeader:
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(HEADER_BYTES)
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise ImatrixError(f"{self.path}: no such base logits file") from None
        except OSError as exc:
            raise ImatrixError(f"{self.path}: cannot read: {exc.strerror}") from exc
        if len(raw) < HEADER_BYTES or raw[: len(MAGIC)] != MAGIC:
            raise ImatrixError(f"{self.path}: not a file of base log-probabilities (no '_logits_' header)")
        header = LogitsHeader(*_HEADER.unpack_from(raw, len(MAGIC)))
        if header.n_ctx < 4 or header.n_vocab < 1 or header.n_chunk < 1:
            raise ImatrixError(f"{self.path}: bad header (n_ctx={header.n_ctx}, n_vocab={header.n_vocab}, "
                               f"n_chunk={header.n_chunk})")
        if size < header.file_bytes:
            raise ImatrixError(f"{self.path}: truncated ({size} bytes, the header promises {header.file_bytes})")
        return header

    def chunk_rows(self, chunk: int) -> np.ndarray:
        """`uint16 [n_scored, row_width]` of one chunk, read from the mmap."""
        start = self.header.data_offset + chunk * self.header.chunk_bytes
        raw = self._data[start : start + self.header.chunk_bytes]
        return raw.view("<u2").reshape(n_scored(self.header.n_ctx), self.header.width)
