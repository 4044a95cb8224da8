"""Several processes (GPUs, machines) over disjoint chunks, with torch.distributed.

Launched with `torchrun`, every rank runs the same schedule (`pipeline.windows`): global batch g goes to
rank g % world. The consumers' per-chunk results (perplexity partials, KL-divergence values, base
log-probabilities) are gathered per window, so every rank folds them in chunk order; imatrix statistics
stay per rank until a save point, where sums and counts are all-reduced. Rank 0 alone reports and writes
files. A `Group` of one process does no communication at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from imatrix.errors import ImatrixError
from imatrix.matrix import ImportanceMatrix


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run: a CUDA device for NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def reduce_matrix(self, local: ImportanceMatrix) -> ImportanceMatrix:
        """Sum of every rank's statistics (sums and counts), on every rank."""
        if self.world == 1:
            return local
        shapes = _union_shapes(self.gather({name: local[name].sums.shape for name in local}))
        sums = np.concatenate([_sums_or_zeros(local, name, shape).ravel() for name, shape in shapes.items()])
        counts = np.concatenate([_counts_or_zeros(local, name, shape[0]) for name, shape in shapes.items()])
        # float64 on the wire: the rank sums add without losing what fp32 accumulation kept
        sums_t = torch.from_numpy(sums.astype(np.float64)).to(self.device)
        counts_t = torch.from_numpy(counts).to(self.device)
        dist.all_reduce(sums_t)
        dist.all_reduce(counts_t)
        return _unflatten(shapes, sums_t.cpu().numpy().astype(np.float32), counts_t.cpu().numpy())


SINGLE = Group()


def from_environment(device: torch.device) -> tuple[Group, torch.device]:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK),
    initialized here (NCCL for CUDA, gloo otherwise), and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as exc:
            raise ImatrixError(f"torch.distributed: cannot join the process group ({exc})") from exc
    return Group(dist.get_rank(), dist.get_world_size(), device), device


def shutdown(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[tuple[Group, torch.device]]:
    """`from_environment` for the block: a process group joined here is left at its end (one the caller
    had initialized stays)."""
    joined_here = not dist.is_initialized()
    group, device = from_environment(device)
    try:
        yield group, device
    finally:
        if joined_here:
            shutdown(group)


def _union_shapes(per_rank: list[dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for rank_shapes in per_rank:
        for name, shape in rank_shapes.items():
            if shapes.setdefault(name, tuple(shape)) != tuple(shape):
                raise ImatrixError(f"ranks disagree on the shape of '{name}': {shapes[name]} vs {tuple(shape)}")
    return dict(sorted(shapes.items()))


def _sums_or_zeros(matrix: ImportanceMatrix, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return matrix[name].sums if name in matrix else np.zeros(shape, dtype=np.float32)


def _counts_or_zeros(matrix: ImportanceMatrix, name: str, n_mat: int) -> np.ndarray:
    return matrix[name].counts if name in matrix else np.zeros(n_mat, dtype=np.int64)


def _unflatten(shapes: dict[str, tuple[int, ...]], sums: np.ndarray, counts: np.ndarray) -> ImportanceMatrix:
    matrix = ImportanceMatrix()
    sum_at = count_at = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        matrix.accumulate(name, sums[sum_at : sum_at + size].reshape(shape), counts[count_at : count_at + shape[0]])
        sum_at, count_at = sum_at + size, count_at + shape[0]
    return matrix
