"""The lattice grids of the i-quants and the neighbour lists their searches use, built as llama.cpp builds
them at init (`iq2xs_init_impl` for the 8-value grids of IQ2_* and IQ1_*, `iq3xs_init_impl` for the 4-value
grids of IQ3_*), and the neighbour search itself.

A grid point is a short vector of level indices `l` (0 .. n_levels-1); ggml-quants.c compares in the odd
coordinates `2*l + 1`. A *code* packs a vector of levels, `bits` per value, value i at bit `bits*i` (the `u`
of the C kernels). For a code off the grid the kernels look only at its neighbours: the grid points at the
`n_distances` smallest distinct squared distances from it (C's `nwant`), nearest first and equal distances
in grid order (llama.cpp sorts (distance, index) pairs with a total comparator, so qsort's instability
does not show). The grids are gguf-py's tables; each lattice is built once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf
import numpy as np

from imatrix.quant.blocks import F32

QType = gguf.GGMLQuantizationType

# Codes per step while building the neighbour lists: bounds the distance matrix to a few MiB.
_CODES_PER_STEP = 1024


@dataclass(frozen=True)
class Lattice:
    """One grid: its points, where each code sits on it, and the neighbours of the codes off it."""

    levels: np.ndarray  # float32 [grid_size, dim]: levels of each grid point
    bits: int  # bits per value in a code
    n_levels: int  # levels per value (the kernels clip to them)
    index_of: np.ndarray  # int32 [2**(bits*dim)]: grid index of a code, -1 off the grid
    first: np.ndarray  # int32 [2**(bits*dim)]: where a code's neighbours start in `neighbours`
    count: np.ndarray  # int32 [2**(bits*dim)]: how many neighbours it has (0 on the grid)
    neighbours: np.ndarray  # flat int32 grid indices, each code's run sorted by (distance, index)
    offsets: np.ndarray  # int32 [len(neighbours), dim]: each neighbour's `i * n_levels + level_i` (search tables)

    def codes_of(self, levels: np.ndarray) -> np.ndarray:
        """Levels `[..., dim]` (integers or exact floats, in range) to codes `[...]`."""
        return codes_of(levels, self.bits)


def codes_of(levels: np.ndarray, bits: int) -> np.ndarray:
    shifts = bits * np.arange(levels.shape[-1], dtype=np.int32)
    return (levels.astype(np.int32) << shifts).sum(axis=-1, dtype=np.int32)


def grid_levels(qtype: QType) -> np.ndarray:
    """int32 `[grid_size, dim]`: the level indices of `qtype`'s grid (gguf-py's table, whose hex digits
    pack the indices; its `grid_map` says which value each index stands for)."""
    quant = getattr(gguf.quants, qtype.name)  # gguf-py names its classes as ggml names the types
    size, dim = quant.grid_shape
    bits = int(np.ceil(np.log2(len(quant.grid_map))))
    per_byte = 8 // bits
    packed = np.frombuffer(bytes.fromhex(quant.grid_hex.decode()), dtype=np.uint8)
    shifts = np.arange(0, 8, 8 // per_byte, dtype=np.uint8)
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(size, dim).astype(np.int32)


@functools.cache
def lattice(qtype: QType, n_distances: int) -> Lattice:
    """`qtype`'s grid with neighbour lists over its `n_distances` nearest distances (built once)."""
    levels = grid_levels(qtype)
    # C's code width: 3 bits for the 8-level 4-vectors of IQ3, 2 bits for the 3-level 8-vectors
    bits = 3 if levels.shape[1] == 4 else 2
    return build_lattice(levels, bits, int(levels.max()) + 1, n_distances)


def build_lattice(levels: np.ndarray, bits: int, n_levels: int, n_distances: int) -> Lattice:
    """Grid tables with the neighbour lists of every code off the grid whose levels are below `n_levels`
    (the kernels clip to those levels: no other code is ever looked up)."""
    n_codes = 1 << (bits * levels.shape[1])
    index_of = np.full(n_codes, -1, dtype=np.int32)
    index_of[codes_of(levels, bits)] = np.arange(levels.shape[0], dtype=np.int32)
    axes = np.indices((n_levels,) * levels.shape[1]).reshape(levels.shape[1], -1).T[:, ::-1]
    off = axes[index_of[codes_of(axes, bits)] < 0]  # every in-range code off the grid, as levels

    parts = [_nearest(levels, off[start : start + _CODES_PER_STEP], n_distances)
             for start in range(0, off.shape[0], _CODES_PER_STEP)]
    count = np.concatenate([p[1] for p in parts])
    first = np.zeros(n_codes, dtype=np.int32)
    counts = np.zeros(n_codes, dtype=np.int32)
    codes = codes_of(off, bits)
    counts[codes] = count
    first[codes] = np.cumsum(count) - count
    neighbours = np.concatenate([p[0] for p in parts]).astype(np.int32)
    offsets = (levels[neighbours] + n_levels * np.arange(levels.shape[1])).astype(np.int32)
    return Lattice(levels.astype(F32), bits, n_levels, index_of, first, counts, neighbours, offsets)


def _nearest(levels: np.ndarray, off: np.ndarray, n_distances: int) -> tuple[np.ndarray, np.ndarray]:
    """For codes `off [m, dim]`: their neighbours, concatenated, and how many each has."""
    # integer squared distances in levels (C's odd coordinates give 4x these: same order, same ties)
    d2 = (off * off).sum(1)[:, None] + (levels * levels).sum(1)[None, :] - 2 * off @ levels.T
    # (distance, grid index) as one sortable integer: the order C's comparator defines
    size = levels.shape[0]
    order = np.sort(d2 * size + np.arange(size), axis=1)
    sorted_d2 = order // size
    new_distance = np.ones(order.shape, dtype=bool)
    new_distance[:, 1:] = sorted_d2[:, 1:] != sorted_d2[:, :-1]
    kept = np.cumsum(new_distance, axis=1) <= n_distances
    return (order[kept] % size).astype(np.int32), kept.sum(axis=1).astype(np.int32)


def best_neighbours(
    lat: Lattice, codes: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray,
    values: np.ndarray | None = None,
) -> np.ndarray:
    """For `m` groups off the grid (`codes [m]`): the neighbour with the least `sum(waux * (scale*q - x)^2)`,
    the first one on ties (C's strict `<`). `xval`, `waux`: `[dim, m]`; `scale`: `[m]`.

    `q` is a level's value: `2l + 1` (`iq2_find_best_neighbour`, `iq3_find_best_neighbour`), or `values`,
    `[n_levels]` or per group `[n_levels, m]` (IQ1's shifted levels, `iq1_find_best_neighbour2`).
    """
    m, dim, n_levels = codes.size, lat.levels.shape[1], lat.n_levels
    count = lat.count[codes]
    seg_start = np.cumsum(count) - count
    total = int(seg_start[-1] + count[-1]) if m else 0
    if total == 0:
        return np.zeros(0, dtype=np.int32)
    entry = np.repeat(lat.first[codes] - seg_start, count) + np.arange(total, dtype=np.int32)
    if values is None:
        values = np.arange(n_levels, dtype=F32) * F32(2) + F32(1)
    q = values.reshape(n_levels, -1).T[:, None, :]  # [1 or m, 1, n_levels]
    # each value's error at every level, once per group: C's (w*diff)*diff; laid out [m, dim, n_levels]
    diff = scale[:, None, None] * q - xval.T[:, :, None]
    err = (waux.T[:, :, None] * diff * diff).reshape(-1)
    owner = np.repeat(np.arange(0, m * dim * n_levels, dim * n_levels, dtype=np.int32), count)
    terms = err[owner[:, None] + lat.offsets[entry]]  # [total, dim]
    d2 = terms[:, 0] + F32(0)  # C starts from 0.0f (which also makes a -0 term +0)
    for i in range(1, dim):
        d2 += terms[:, i]
    # d2 >= 0: its bits order like the value, so (bits, position) finds the first minimum in one pass
    key = (d2.view(np.int32).astype(np.int64) << 32) | np.arange(total, dtype=np.int64)
    first_best = (np.minimum.reduceat(key, seg_start) & 0xFFFFFFFF).astype(np.intp)
    return lat.neighbours[entry[first_best]]
