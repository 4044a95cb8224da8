"""Calibration text -> token chunks, exactly as llama-imatrix's `compute_imatrix` cuts them."""

from __future__ import annotations

import codecs
import warnings
from pathlib import Path

import numpy as np

from imatrix.errors import ImatrixError, ImatrixWarning
from imatrix.models.tokenizer import TextTokenizer


def read_calibration_text(path: str | Path) -> str:
    """The text as llama.cpp reads a `-f` file: bytes that are not UTF-8 become U+FFFD, with a warning."""
    source = Path(path)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ImatrixError(f"{source}: no such calibration text file") from None
    except OSError as exc:
        raise ImatrixError(f"{source}: cannot read: {exc.strerror}") from exc
    text = decode_like_llama_cpp(raw, source)
    # llama.cpp's `-f` handler drops one trailing newline
    return text[:-1] if text.endswith("\n") else text


def decode_like_llama_cpp(raw: bytes, source: object) -> str:
    """UTF-8 with one U+FFFD per byte that does not decode, as llama.cpp's `unicode_cpts_from_utf8` replaces
    them for BPE vocabularies (Python's "replace" gives one per maximal invalid sequence: other tokens).

    llama.cpp's SentencePiece tokenizer instead passes the bytes on to byte fallback (its character splitter
    trusting each lead byte's length): token ids differ there around each such byte.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as first:
        text = raw.decode("utf-8", errors=_PER_BYTE)
        n_bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        warnings.warn(f"{source}: {n_bad} byte(s) are not UTF-8 (the first at byte {first.start}); each is read "
                      "as U+FFFD, as llama.cpp's BPE tokenizers read them (its SentencePiece ones keep the bytes)",
                      ImatrixWarning, stacklevel=3)
        return text


def _replace_one_byte(error: UnicodeError) -> tuple[str, int]:
    return "\ufffd", error.start + 1


_PER_BYTE = "imatrix-replace-per-byte"
codecs.register_error(_PER_BYTE, _replace_one_byte)


def make_chunks(tokens: list[int] | np.ndarray, n_ctx: int, from_chunk: int = 0, max_chunks: int = -1,
                bos_id: int | None = None, source: object = "the text") -> np.ndarray:
    """`int64 [n_chunk, n_ctx]`: chunk i = tokens[i·n_ctx, (i+1)·n_ctx), first token BOS if given."""
    ids = np.asarray(tokens, dtype=np.int64)
    if from_chunk > 0:
        if (from_chunk + 2) * n_ctx >= ids.size:
            raise ImatrixError(
                f"{source}: not enough tokens left after skipping {from_chunk} chunks "
                f"({ids.size} tokens, context {n_ctx})"
            )
        ids = ids[from_chunk * n_ctx :]
    if ids.size < 2 * n_ctx:
        raise ImatrixError(
            f"{source}: tokenizes to only {ids.size} tokens; at least {2 * n_ctx} are needed "
            f"for a context of {n_ctx}"
        )
    n_chunk = ids.size // n_ctx
    if max_chunks >= 0:
        n_chunk = min(n_chunk, max_chunks)
    chunks = ids[: n_chunk * n_ctx].reshape(n_chunk, n_ctx).copy()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def tokenize_chunks(tokenizer: TextTokenizer, text: str, n_ctx: int, from_chunk: int = 0,
                    max_chunks: int = -1, parse_special: bool = False, source: object = "the text") -> np.ndarray:
    tokens = tokenizer.encode(text, parse_special=parse_special)
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    return make_chunks(tokens, n_ctx, from_chunk, max_chunks, bos_id, source)
