"""How a run's chunks are grouped: -b batches, steps (one batch per rank) and windows (the steps run
before the consumers fold their results). Pure: `tests/test_saves.py` and `tests/test_distributed.py`
check the plans.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

from imatrix.pipeline.distributed import Group


@dataclass(frozen=True)
class Step:
    """One batch per rank: global batches [first_batch, first_batch + world)."""

    first_batch: int
    batches: list[tuple[int, int]]  # (first chunk, n chunks) per global batch

    @property
    def n_chunks(self) -> int:
        return sum(size for _, size in self.batches)

    @property
    def start(self) -> int:
        return self.batches[0][0]

    @property
    def stop(self) -> int:
        first, size = self.batches[-1]
        return first + size

    def chunks(self) -> range:
        return range(self.start, self.stop)


Window = list[Step]


def plan_windows(n_chunk: int, n_seq: int, group: Group, window_chunks: int, cuts: Collection[int] = (),
                 ends: Collection[int] = ()) -> list[Window]:
    """Steps grouped into windows: a window ends where one of `ends` falls (its chunks all done by then),
    or at `window_chunks` chunks.

    -b batches of `n_seq` chunks are cut at `cuts` (a step then ends there too), so that a point there sees
    exactly the chunks before it; they stay whole otherwise (results do not depend on how chunks are batched).
    """
    batches = []
    for first in range(0, n_chunk, n_seq):
        stop = min(first + n_seq, n_chunk)
        edges = [first, *(cut for cut in sorted(cuts) if first < cut < stop), stop]
        batches.extend((start, end - start) for start, end in itertools.pairwise(edges))
    steps: list[Step] = []
    for index, batch in enumerate(batches):
        if not steps or len(steps[-1].batches) == group.world or steps[-1].stop in cuts:
            steps.append(Step(index, []))
        steps[-1].batches.append(batch)
    windows: list[Window] = [[]]
    for step in steps:
        windows[-1].append(step)
        ends_here = any(step.start < point <= step.stop for point in ends)
        if ends_here or sum(s.n_chunks for s in windows[-1]) >= window_chunks:
            windows.append([])
    return [window for window in windows if window]
