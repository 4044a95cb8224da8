"""The one loop every forward pass goes through: collection, perplexity and KL divergence alike.

Chunks are planned into windows of steps (`pipeline.windows`); each rank puts its batches of a window
through the executor (`pipeline.executors`), one at a time or several chunks in flight
(`pipeline.in_flight`), and lets the consumer score each batch's hidden states; the consumer then gets
every rank's results of the window (`pipeline.distributed`) and folds them in chunk order. What is
measured is the consumer's business (`collection.run`, `eval.perplexity`, `eval.kld`), how the model
runs the executor's: the runner knows only their protocols.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import numpy as np
import torch

from imatrix.pipeline.distributed import SINGLE, Group
from imatrix.pipeline.executors import Executor
from imatrix.pipeline.in_flight import ChunksInFlight
from imatrix.pipeline.windows import Window, plan_windows
from imatrix.reporter import SILENT, Reporter


class Consumer(Protocol):
    """What a run measures. The runner calls `attached` around the whole run, `score` for each batch (in the
    thread, and on the rank, that ran it; inside `in_slot` when several chunks are in flight) and
    `end_window` after each window on every rank, with every rank's results of the window."""

    projects_output: bool  # whether `score` is called (and the executor lends the output projection)

    def attached(self, n_slots: int) -> AbstractContextManager[None]:
        """What the run needs attached to the model while it runs (hooks), with `n_slots` threads adding at once."""
        ...

    def in_slot(self, slot: int) -> AbstractContextManager[None]:
        """The calling thread works for slot `slot` inside the block."""
        ...

    def score(self, chunks: Sequence[int], head: torch.nn.Module, hidden: torch.Tensor,
              tokens: torch.Tensor) -> list[Any]:
        """One picklable result per sequence of a batch of `chunks` (their indices): its final hidden states
        `[n_seq, n_ctx, d_model]` through the output projection `head`, its token ids `[n_seq, n_ctx]` (on the
        executor's device)."""
        ...

    def end_window(self, window: Window, results: dict[int, Any], seconds: float) -> None:
        """Fold the window's results (chunk index -> `score`'s result), chunk by chunk; `seconds` it took."""
        ...


class Unhooked:
    """For a consumer that attaches nothing to the model: it measures from the output projection alone."""

    def attached(self, n_slots: int) -> AbstractContextManager[None]:
        return nullcontext()

    def in_slot(self, slot: int) -> AbstractContextManager[None]:
        return nullcontext()


def run(executor: Executor, chunks: np.ndarray, consumer: Consumer, n_seq: int, group: Group = SINGLE,
        reporter: Reporter = SILENT, chunks_in_flight: int = 0, cuts: Collection[int] = (),
        ends: Collection[int] = (), label: str | None = "imatrix") -> float:
    """Run `chunks` (`int64 [n_chunk, n_ctx]`, what the model reads) through `executor` in batches of `n_seq`
    into `consumer`; windows end at the chunk counts `ends`, batches are cut at `cuts` (`plan_windows`).
    `label` titles the progress bar (None: no bar). Returns the seconds it took."""
    n_chunk, n_ctx = chunks.shape
    in_flight = executor.chunks_in_flight(chunks_in_flight)
    # each chunk in flight needs its place in the window (a window of one step has one chunk at least)
    windows = plan_windows(n_chunk, n_seq, group, max(executor.window_chunks, in_flight), set(cuts), set(ends))
    start = time.perf_counter()
    with reporter.progress(n_chunk * n_ctx, label) as progress, consumer.attached(in_flight), \
            torch.inference_mode(), _pool(in_flight, consumer) as pool:
        for window in windows:
            began = time.perf_counter()
            mine = _run_window(executor, chunks, window, consumer, group, pool, n_seq)
            results = dict(pair for rank_results in group.gather(mine) for pair in rank_results)
            consumer.end_window(window, results, time.perf_counter() - began)
            progress.update(sum(step.n_chunks for step in window) * n_ctx)
    return time.perf_counter() - start


def _pool(in_flight: int, consumer: Consumer) -> AbstractContextManager[ChunksInFlight | None]:
    return ChunksInFlight(in_flight, consumer.in_slot, torch.get_num_threads()) if in_flight > 1 else nullcontext()


def _run_window(executor: Executor, chunks: np.ndarray, window: Window, consumer: Consumer, group: Group,
                pool: ChunksInFlight | None, n_seq: int) -> list[tuple[int, Any]]:
    """This rank's batches of the window through the model; the consumer's result for each chunk."""
    mine = [batch for step in window for index, batch in enumerate(step.batches, step.first_batch)
            if group.owns(index)]
    if not mine:
        return []
    if pool is not None:
        indices = [first + seq for first, size in mine for seq in range(size)]
        return _run_chunks_in_flight(executor, chunks, indices, consumer, pool, n_seq)
    tensors = [torch.from_numpy(chunks[first : first + size]).to(executor.device) for first, size in mine]
    hidden = executor.hidden_states(tensors)
    results: list[tuple[int, Any]] = []
    if not consumer.projects_output:
        return results  # the output projection is not even loaded
    with executor.output_head() as head:
        for (first, size), batch, states in zip(mine, tensors, hidden, strict=True):
            results.extend(enumerate(consumer.score(range(first, first + size), head, states, batch), first))
    return results


def _run_chunks_in_flight(executor: Executor, chunks: np.ndarray, indices: list[int], consumer: Consumer,
                          pool: ChunksInFlight, n_seq: int) -> list[tuple[int, Any]]:
    """The chunks through the model and scored in their pool slots, a -b batch's chunks shared among the
    slots (up to the executor's `sequences_per_forward` per forward)."""
    per_forward = min(executor.sequences_per_forward or n_seq, max(1, n_seq // pool.n_slots))

    def run_group(group: list[int]) -> list[Any]:
        batch = torch.from_numpy(chunks[group]).to(executor.device)
        (states,) = executor.hidden_states([batch])
        if not consumer.projects_output:
            return [None] * len(group)
        with executor.output_head() as head:
            return consumer.score(group, head, states, batch) or [None] * len(group)

    results = pool.map(run_group, indices, per_forward)
    return [(chunk, results[chunk]) for chunk in indices if results[chunk] is not None]
