"""The text tokenized in a forked process while this one imports torch and transformers and loads the model.

A GGUF vocabulary's tokenizer needs neither torch nor transformers: building it and tokenizing the text
(SmolLM2 and calibration.txt: 0.1 s and 0.25 s) can run on a second core during the imports (~3 s of one
core). `TokensAhead.start` forks a child that does both; where the collection would tokenize, the tokenizer
`with_tokens_ahead` wraps hands out the child's tokens instead, once it is sure they are for the same
text. The child never decides anything: if it cannot run (not Linux, no GGUF file) or fails in any way, the
text is tokenized here by the same code, which then reports whatever was wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.ggufio.reader import GGUFModelFile, is_gguf
from imatrix.models.tokenizer import TextTokenizer, tokenizer_from_gguf
from imatrix.pipeline.chunks import read_calibration_text
from imatrix.quant.workers import child_of

# how often the wait for the child checks that it is still alive
_POLL_SECONDS = 0.05
# how long a child that has sent its result gets to exit before it is stopped
_EXIT_SECONDS = 1.0


@dataclass(frozen=True)
class Tokenized:
    """What the child sends back."""

    text_sha256: bytes  # of the text it read, UTF-8
    parse_special: bool
    tokens: np.ndarray  # int64
    seconds: float  # building the tokenizer and tokenizing


class TokensAhead:
    """A child process tokenizing `text_path` with `model_path`'s vocabulary; use as a context manager (the
    child is stopped on exit if it is still running)."""

    def __init__(self, process: Any, connection: Connection) -> None:
        self.process, self.connection = process, connection
        self._result: Tokenized | None = None
        self._received = False

    @classmethod
    def start(cls, model_path: str | Path | Any, text_path: str | Path | None,
              parse_special: bool) -> TokensAhead | None:
        """The child for a GGUF model file and a text file; None where there is nothing to do ahead (another
        kind of model, not Linux)."""
        if not isinstance(model_path, str | Path) or text_path is None or not _is_gguf_file(Path(model_path)):
            return None
        if not sys.platform.startswith("linux"):  # fork is safe before torch loads; macOS frameworks dislike it
            return None
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_tokenize_in_child,
                                  args=(os.getpid(), receiver, sender, Path(model_path), Path(text_path),
                                        parse_special),
                                  name="imatrix-tokenize", daemon=True)
        process.start()
        sender.close()
        return cls(process, receiver)

    def tokens_for(self, text: str, parse_special: bool) -> Tokenized | None:
        """The child's result if it tokenized this very text with `parse_special`, waiting for it; else None."""
        result = self._receive()
        if result is None or result.parse_special != parse_special or result.text_sha256 != _sha256(text):
            return None
        return result

    def _receive(self) -> Tokenized | None:
        if not self._received:
            self._received = True
            self._result = self._wait()
            self.close()
        return self._result

    def _wait(self) -> Tokenized | None:
        while not self.connection.poll(_POLL_SECONDS):
            if not self.process.is_alive() and not self.connection.poll(0):
                return None
        try:
            result = self.connection.recv()
        except (EOFError, OSError):
            return None
        return result if isinstance(result, Tokenized) else None

    def close(self) -> None:
        self.connection.close()
        if self._received:
            self.process.join(_EXIT_SECONDS)
        if self.process.is_alive():
            # SIGKILL: a child stopped right after the fork still has the parent's SIGTERM handler
            self.process.kill()
        self.process.join()

    def __enter__(self) -> TokensAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _AheadTokenizer:
    """A `TextTokenizer` whose `encode` takes the child's tokens where they are for the same text."""

    def __init__(self, tokenizer: TextTokenizer, ahead: TokensAhead) -> None:
        self.wrapped, self.ahead = tokenizer, ahead
        self.bos_id, self.add_bos = tokenizer.bos_id, tokenizer.add_bos
        self.seconds: float | None = None  # the child's tokenizing time, when its tokens were taken

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        result = self.ahead.tokens_for(text, parse_special)
        if result is None:
            return self.wrapped.encode(text, parse_special=parse_special)
        self.seconds = result.seconds
        return result.tokens.tolist()


def with_tokens_ahead(tokenizer: TextTokenizer, ahead: TokensAhead | None) -> TextTokenizer:
    """`tokenizer`, taking the child's tokens for the text the child tokenized (`tokenizer` itself without one)."""
    return tokenizer if ahead is None else _AheadTokenizer(tokenizer, ahead)


def ahead_note(tokenizer: TextTokenizer) -> str:
    """What a "tokenization took" line adds when the tokens came from the child: its own time."""
    if not isinstance(tokenizer, _AheadTokenizer) or tokenizer.seconds is None:
        return ""
    return f" (in {1e3 * tokenizer.seconds:g} ms in another process, while the model loaded)"


def _tokenize_in_child(parent_pid: int, receiver: Connection, sender: Connection, model_path: Path,
                       text_path: Path, parse_special: bool) -> None:
    child_of(parent_pid)  # a parent killed with -9 leaves no tokenizing orphan behind
    receiver.close()  # the parent's end only: once the parent closes it, a send here fails instead of blocking
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the parent may have used the tokenizers' threads
    warnings.simplefilter("ignore")  # the parent reads the text again and warns itself
    try:
        start = time.perf_counter()
        text = read_calibration_text(text_path)
        tokenizer = tokenizer_from_gguf(GGUFModelFile(model_path))
        tokens = np.asarray(tokenizer.encode(text, parse_special=parse_special), dtype=np.int64)
        result = Tokenized(_sha256(text), parse_special, tokens, time.perf_counter() - start)
    except Exception:  # noqa: BLE001 - the parent tokenizes again and reports the error itself
        result = None
    with contextlib.suppress(OSError):  # the parent has gone, or stopped waiting
        sender.send(result)
    sender.close()


def _is_gguf_file(path: Path) -> bool:
    try:
        return path.is_file() and is_gguf(path)
    except OSError:
        return False


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
