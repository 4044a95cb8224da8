"""Several chunks through a CPU model at once, each forward in its own thread.

A 512-token forward of a small model does not keep the cores busy with intra-op threads alone: its
elementwise ops, attention and narrow matmuls split poorly across threads. Two chunks in flight,
each on half the threads, collect ~10% faster on 2 cores (benchmarks/collect_speed.py compares).
Chunk c always runs in slot c % n and adds into that slot's accumulators (the consumer's `in_slot`), in
chunk order within the slot: the result is the same whichever thread finishes first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TypeVar

import torch

Result = TypeVar("Result")


def default_chunks_in_flight(threads: int) -> int:
    """On the CPU: two chunks at once with two threads or more."""
    return 2 if threads >= 2 else 1


class ChunksInFlight:
    """A pool of `n_slots` threads sharing `threads` intra-op threads; use as a context manager. The work of
    slot i runs inside `in_slot(i)`."""

    def __init__(self, n_slots: int, in_slot: Callable[[int], AbstractContextManager[None]], threads: int) -> None:
        self.n_slots, self.in_slot, self.threads = n_slots, in_slot, threads
        self.threads_per_chunk = max(1, threads // n_slots)
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()  # set on an error or Ctrl-C: workers stop after their forward

    def __enter__(self) -> ChunksInFlight:
        self._pool = ThreadPoolExecutor(self.n_slots, thread_name_prefix="imatrix-chunk")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        # torch.set_num_threads in the workers also set the default for threads started later
        torch.set_num_threads(self.threads)

    def map(self, work: Callable[[list[int]], list[Result]], chunks: list[int],
            per_call: int = 1) -> dict[int, Result]:
        """`work(group)` for groups of up to `per_call` chunk indices of the same slot, slot by slot
        in parallel; `work` returns a result per chunk of its group. Results by chunk."""
        by_slot = [[chunk for chunk in chunks if chunk % self.n_slots == slot] for slot in range(self.n_slots)]
        futures = [self._pool.submit(self._run_slot, slot, work, mine, per_call)
                   for slot, mine in enumerate(by_slot) if mine]
        results: dict[int, Result] = {}
        for future in futures:
            results.update(future.result())
        return results

    def _run_slot(self, slot: int, work: Callable[[list[int]], list[Result]], chunks: list[int],
                  per_call: int) -> dict[int, Result]:
        torch.set_num_threads(self.threads_per_chunk)  # this thread's OpenMP/MKL team
        with self.in_slot(slot), torch.inference_mode():  # grad mode is per thread
            results = {}
            for first in range(0, len(chunks), per_call):
                if self._stopping.is_set():
                    break
                group = chunks[first : first + per_call]
                results.update(zip(group, work(group), strict=True))
            return results
