"""When llama-imatrix saves (-ofreq, --save-frequency), replayed exactly (`llama_cpp_saves`, pure and
unit-tested in tests/test_saves.py), and the saver that writes those saves during a run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imatrix.formats import save_imatrix
from imatrix.matrix import ImportanceMatrix
from imatrix.pipeline.distributed import Group
from imatrix.reporter import INFO, Reporter

# llama.cpp's default -ub: llama-imatrix checks whether to save once per micro-batch of at most this many tokens
LLAMA_CPP_UBATCH = 512


@dataclass(frozen=True)
class SaveEvent:
    """A save llama-imatrix makes: after the micro-batch in which its chunk count (tokens seen / n_ctx)
    reaches a multiple of a frequency, or steps over one (`IMatrixCollector::collect_imatrix`)."""

    chunk_count: int  # llama.cpp's count when it saves: names the snapshot
    chunks_done: int  # chunks of this run that hold those tokens
    batch: int  # the -b batch it saves in: llama.cpp prints a newline per save before that batch's ppl lines
    output: bool  # --output-frequency: the output file
    snapshot: bool  # --save-frequency: <out>.at_<chunk_count>


def llama_cpp_saves(n_chunk: int, n_ctx: int, n_seq: int, n_batch: int, base_tokens: int,
                    output_frequency: int, save_frequency: int) -> list[SaveEvent]:
    """The saves llama-imatrix makes over `n_chunk` chunks, on top of `base_tokens` loaded with
    --in-file, replaying its token count micro-batch by micro-batch (`n_batch` as clamped to n_seq·n_ctx)."""
    tokens, last = base_tokens, base_tokens // n_ctx
    events = []
    for batch, first in enumerate(range(0, n_chunk, n_seq)):
        for micro_batch in _micro_batches(n_seq, min(n_seq, n_chunk - first), n_ctx, n_batch):
            tokens += micro_batch
            count = tokens // n_ctx
            if count == last:
                continue
            step, last = count - last, count
            output = output_frequency > 0 and (count % output_frequency) // step == 0
            snapshot = save_frequency > 0 and (count % save_frequency) // step == 0
            if output or snapshot:
                done = -(-(count * n_ctx - base_tokens) // n_ctx)
                events.append(SaveEvent(count, done, batch, output, snapshot))
    return events


def _micro_batches(n_seq: int, batch_chunks: int, n_ctx: int, n_batch: int) -> Iterator[int]:
    """Tokens in each micro-batch llama.cpp cuts one -b batch of `batch_chunks` chunks into.

    One sequence: decodes of n_batch tokens (several per chunk when -b < -c), each cut flat. Several:
    every sequence has a KV stream of its own, and `split_equal` (llama-batch.cpp) takes the same
    number of tokens from each, as many as fit: 510 tokens for 6 sequences, 504 for 12.
    """
    ubatch = min(LLAMA_CPP_UBATCH, n_batch)
    if n_seq == 1:
        for start in range(0, n_ctx, n_batch):
            decode = min(n_batch, n_ctx - start)
            yield from (min(ubatch, decode - at) for at in range(0, decode, ubatch))
        return
    per_sequence = max(1, ubatch // batch_chunks)
    for start in range(0, n_ctx, per_sequence):
        yield min(per_sequence, n_ctx - start) * batch_chunks


def snapshot_cuts(events: list[SaveEvent]) -> set[int]:
    """Where -b batches are cut (`pipeline.windows.plan_windows`): a snapshot holds exactly the chunks its
    name says."""
    return {event.chunks_done for event in events if event.snapshot}


def save_points(events: list[SaveEvent]) -> set[int]:
    """Where windows end: every save sees complete data."""
    return {event.chunks_done for event in events}


class Saver:
    """Writes llama.cpp's saves (`llama_cpp_saves`) at the end of the window they fall in.

    A snapshot holds exactly the chunks its name says: the plan cuts the windows there (`snapshot_cuts`).
    The output file is written at the end of the step that reaches its count, with every chunk done by
    then (a -b batch is not cut for it), and says how many it holds.
    """

    def __init__(self, output_file: Path | None, output_format: str, reporter: Reporter, group: Group,
                 events: list[SaveEvent]) -> None:
        self.output_file, self.output_format, self.reporter, self.group = output_file, output_format, reporter, group
        self.events = events if output_file is not None else []
        self._pending = list(self.events)

    def newlines_before(self, n_seq: int) -> dict[int, int]:
        """Chunk index -> newlines llama.cpp prints before that chunk's ppl line (one per save)."""
        newlines: dict[int, int] = {}
        for event in self.events:
            newlines[event.batch * n_seq] = newlines.get(event.batch * n_seq, 0) + event.output + event.snapshot
        return newlines

    def after_window(self, matrix_at: Callable[[], ImportanceMatrix], chunks_done: int) -> None:
        due = [event for event in self._pending if event.chunks_done <= chunks_done]
        if not due:
            return
        self._pending = self._pending[len(due):]
        matrix = matrix_at()  # a collective under torch.distributed: every rank gets here
        if any(event.output for event in due):
            self.save(matrix, self.output_file)
        for event in due:
            if event.snapshot:
                self.save(matrix, Path(f"{self.output_file}.at_{event.chunk_count}"))

    def save(self, matrix: ImportanceMatrix, path: Path, newline: bool = False) -> None:
        if not self.group.is_main:
            return
        save_imatrix(matrix, path, self.output_format, self.reporter)
        if newline and self.reporter.verbosity >= INFO:
            self.reporter.result("\n")
        self.reporter.info(f"save_imatrix: stored collected data after {matrix.chunk_count} chunks in {path}")
