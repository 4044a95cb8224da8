"""`ImportanceMatrix`: per-tensor Σx² and token counts, the type every part of imatrix uses.

Layout follows llama.cpp's GGUF imatrix: for each weight, `sums` is `[n_mat, n_cols]` (n_mat is
the number of experts for MoE weights, 1 for dense ones) and `counts` is `[n_mat]` token rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from imatrix.errors import ImatrixError, shown


@dataclass
class TensorStats:
    """Accumulated statistics of one weight matrix (or stack of expert matrices)."""

    sums: np.ndarray  # float32 [n_mat, n_cols]: Σ over token rows of x_j²
    counts: np.ndarray  # int64 [n_mat]: token rows seen by each matrix

    def __post_init__(self) -> None:
        # own copies: statistics that shared the caller's buffers would change when it refills them
        self.sums = np.array(self.sums, dtype=np.float32, order="C")
        if self.sums.ndim == 1:
            self.sums = self.sums.reshape(1, -1)
        self.counts = np.array(self.counts, dtype=np.int64).reshape(-1)
        if self.sums.shape[0] != self.counts.shape[0]:
            raise ImatrixError(
                f"sums have {self.sums.shape[0]} matrices but counts have {self.counts.shape[0]}"
            )

    @property
    def n_mat(self) -> int:
        return self.sums.shape[0]

    @property
    def n_cols(self) -> int:
        return self.sums.shape[1]

    def mean_sq(self) -> np.ndarray:
        """Σx²/count per matrix: the weights llama-quantize uses. Matrices with no data give 0."""
        safe = np.where(self.counts > 0, self.counts, 1).astype(np.float32)
        means = self.sums / safe[:, None]
        means[self.counts == 0] = 0.0
        return means

    def copy(self) -> TensorStats:
        return TensorStats(self.sums, self.counts)


@dataclass
class ImportanceMatrix:
    """Statistics for every collected weight, keyed by GGUF tensor name (`blk.0.attn_q.weight`)."""

    tensors: dict[str, TensorStats] = field(default_factory=dict)
    chunk_size: int = 0
    chunk_count: int = 0
    datasets: list[str] = field(default_factory=list)
    # the run that collected it, as GGUF metadata keys (imatrix.resume.*) that --resume checks
    run_keys: dict[str, str | int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.tensors))

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def max_count(self) -> int:
        return max((int(t.counts.max()) for t in self.tensors.values() if t.counts.size), default=0)

    def update_chunk_count(self) -> None:
        """chunk_count = max count / chunk_size, as llama.cpp derives it after loading files."""
        if self.chunk_size > 0:
            self.chunk_count = self.max_count() // self.chunk_size

    def accumulate(self, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
        """Add raw sums/counts for one weight, creating the entry on first use."""
        incoming = TensorStats(sums, counts)
        current = self.tensors.get(name)
        if current is None:
            self.tensors[name] = incoming
            return
        _add_into(name, current, incoming)

    def merge(self, other: ImportanceMatrix) -> ImportanceMatrix:
        """Sum of two imatrices (llama.cpp's `--in-file a --in-file b`): sums and counts add."""
        merged = self.copy()
        merged.merge_in(other)
        return merged

    def merge_in(self, other: ImportanceMatrix) -> None:
        for name in other.tensors:
            incoming = other.tensors[name]
            if name in self.tensors:
                _add_into(name, self.tensors[name], incoming)
            else:
                self.tensors[name] = incoming.copy()
        self.datasets = self.datasets + list(other.datasets)
        if not self.chunk_size:
            self.chunk_size = other.chunk_size
        self.update_chunk_count()

    def copy(self) -> ImportanceMatrix:
        return ImportanceMatrix(
            {name: stats.copy() for name, stats in self.tensors.items()},
            self.chunk_size,
            self.chunk_count,
            list(self.datasets),
            dict(self.run_keys),
        )


def _add_into(name: str, current: TensorStats, incoming: TensorStats) -> None:
    if current.sums.size != incoming.sums.size:
        raise ImatrixError(
            f"cannot merge {shown(name)}: {current.sums.size} values vs {incoming.sums.size}"
        )
    if current.n_mat == 1 and incoming.n_mat > 1:
        # llama.cpp broadcasts a single count over experts when an old file meets a MoE one
        current.counts = np.full(incoming.n_mat, current.counts[0], dtype=np.int64)
        current.sums = current.sums.reshape(incoming.sums.shape)
    elif incoming.n_mat == 1 and current.n_mat > 1:
        # and the other way round (`load_imatrix`'s legacy branch): a .dat entry, whose experts share
        # one count, adds its values in place and its count to every expert
        current.sums += incoming.sums.reshape(current.sums.shape)
        current.counts += incoming.counts[0]
        return
    elif current.n_mat != incoming.n_mat:
        raise ImatrixError(
            f"cannot merge {shown(name)}: {current.n_mat} matrices vs {incoming.n_mat}"
        )
    current.sums += incoming.sums.reshape(current.sums.shape)
    current.counts += incoming.counts


MAX_COUNT = 2**62  # counts are int64; F32 cannot hold more exactly anyway


def statistics_problem(sums: np.ndarray, counts: np.ndarray) -> str | None:
    """What makes stored statistics garbage (sums of squares that are negative or not finite, token counts that
    are negative, fractional or not finite), or None. Squares are never negative; llama-imatrix stops on a
    non-finite activation before it saves."""
    if not np.isfinite(counts).all():
        return "token counts that are not numbers"
    if (counts < 0).any() or (counts > MAX_COUNT).any():
        return "token counts that are negative or too large"
    if (counts != np.rint(counts)).any():
        return "token counts that are not whole numbers"
    if not np.isfinite(sums).all():
        return "sums that are NaN or infinite"
    if (sums < 0).any():
        return "negative sums of squares"
    return None
