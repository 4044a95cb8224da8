"""The lattice grids of the i-quants and the neighbour lists their searches use, built as llama.cpp builds
them at init (`iq2xs_init_impl` for the 8-value grids of IQ2_* and IQ1_*, `iq3xs_init_impl` for the 4-value
grids of IQ3_*), and the neighbour search itself: `best_neighbours` as C does it, group by group, and
`best_on_grid`, which finds the same neighbours for every trial scale of a kernel's search at once (see
there) and leaves to `best_neighbours` only the cases it cannot decide.

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

from imatrix.quant.blocks import F32, sum_groups

QType = gguf.GGMLQuantizationType

# Codes per step while building the neighbour lists: bounds the distance matrix to a few MiB.
_CODES_PER_STEP = 1024


@dataclass(frozen=True)
class Bucket:
    """The neighbour lists of the codes with at most `width` neighbours (and more than half as many),
    padded to `width`: one row per code."""

    width: int
    neighbours: np.ndarray  # int32 [codes, width]: grid indices (padding repeats the first)
    levels: np.ndarray  # uint8 [codes, width, dim]: their levels
    odd: np.ndarray  # uint8 [codes, width, dim]: their values 2l+1
    odd_max: np.ndarray  # float32 [codes, dim]: the largest 2l+1 of each value over the neighbours
    pad: np.ndarray  # float32 [width, codes]: 0, or +inf for the padding


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
    point_codes: np.ndarray  # int32 [grid_size]: the code of each grid point
    # the neighbour lists again, padded into a few tables of fixed widths (`best_on_grid`)
    buckets: tuple[Bucket, ...]
    bucket_of: np.ndarray  # int8 [2**(bits*dim)]: which table holds a code's list (-1: none)
    row_of: np.ndarray  # int32 [2**(bits*dim)]: its row there
    flat_base: np.ndarray  # int64 [2**(bits*dim)]: where that row starts in `flat_neighbours`
    flat_neighbours: np.ndarray  # int32: the tables' neighbours, concatenated

    def codes_of(self, levels: np.ndarray, axis: int = -1) -> np.ndarray:
        """Levels `[..., dim]` (integers or exact floats, in range; `axis`: the values' axis) to codes `[...]`."""
        return codes_of(levels, self.bits, axis)


def codes_of(levels: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Levels (integers or exact floats, in range) to codes, the values along `axis`."""
    levels = np.moveaxis(levels, axis, 0)
    code = levels[0].astype(np.int32)
    for i in range(1, levels.shape[0]):
        code |= levels[i].astype(np.int32) << (bits * i)
    return code


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
    buckets, bucket_of, row_of, flat_base = _buckets(levels, first, counts, neighbours)
    flat = np.concatenate([b.neighbours.reshape(-1) for b in buckets])
    return Lattice(levels.astype(F32), bits, n_levels, index_of, first, counts, neighbours, offsets,
                   codes_of(levels, bits), buckets, bucket_of, row_of, flat_base, flat)


def _buckets(
    levels: np.ndarray, first: np.ndarray, count: np.ndarray, neighbours: np.ndarray
) -> tuple[tuple[Bucket, ...], np.ndarray, np.ndarray, np.ndarray]:
    """The neighbour lists padded to widths 1, 2, 4, 8, ... (at most twice a list's length)."""
    width_of = np.where(count > 0, 1 << np.ceil(np.log2(np.maximum(count, 1))).astype(np.int64), 0)
    bucket_of = np.full(count.size, -1, dtype=np.int8)
    row_of = np.zeros(count.size, dtype=np.int32)
    flat_base = np.zeros(count.size, dtype=np.int64)
    buckets, base = [], 0
    for width in np.unique(width_of[width_of > 0]):
        codes = np.flatnonzero(width_of == width)
        bucket_of[codes], row_of[codes] = len(buckets), np.arange(codes.size)
        flat_base[codes] = base + width * np.arange(codes.size)
        base += width * codes.size
        slot = np.arange(width)
        real = slot < count[codes][:, None]
        grid = neighbours[first[codes][:, None] + np.where(real, slot, 0)]
        odd = (2 * levels[grid] + 1).astype(np.uint8)
        buckets.append(Bucket(int(width), grid, levels[grid].astype(np.uint8), odd,
                              odd.max(axis=1).astype(F32), np.where(real, F32(0), F32(np.inf)).T.copy()))
    return tuple(buckets), bucket_of, row_of, flat_base


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
    count = lat.count[codes]
    owner = np.repeat(np.arange(codes.size), count)
    starts = np.cumsum(count) - count
    entry = np.repeat(lat.first[codes] - starts, count) + np.arange(owner.size)
    return _first_least(lat, lat.neighbours[entry], owner, xval, waux, scale, values)


def _first_least(
    lat: Lattice, points: np.ndarray, owner: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray,
    values: np.ndarray | None,
) -> np.ndarray:
    """Per group (`xval`, `waux` `[dim, m]`, `scale [m]`, `values` as for `best_neighbours`), the first of
    its candidate grid points (`points [P]`, `owner [P]`: each one's group, groups in order, each group's
    candidates in list order) with the least error as C computes it in float32: from 0, value by value,
    `d2 += (waux * diff) * diff` with `diff = scale * q - x`."""
    if points.size == 0:
        return np.zeros(xval.shape[1], dtype=np.int32)
    levels = lat.levels[points].astype(np.intp)  # [P, dim]
    if values is None:
        q = F32(2) * levels.astype(F32) + F32(1)
    else:
        table = values.reshape(lat.n_levels, -1).astype(F32)
        q = table[levels, owner[:, None] if table.shape[1] > 1 else 0]
    s = np.take(scale, owner)
    d2 = np.zeros(points.size, dtype=F32)
    for i in range(levels.shape[1]):
        diff = s * q[:, i] - np.take(xval[i], owner)
        d2 += (np.take(waux[i], owner) * diff) * diff
    # d2 >= 0 (or not a number): its bits order like the value, so (bits, position) finds the first least
    key = (d2.view(np.int32).astype(np.int64) << 32) | np.arange(points.size, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
    return points[np.minimum.reduceat(key, starts) & 0xFFFFFFFF].astype(np.int32)


# ----------------------------------------------------------------------------- runs of trials

# How far C's float32 `d2` of a neighbour can stray from the real value, in units of u S (u = 2**-24,
# S = sum(w (s q + |x|)^2) over its values): products, a difference and the sums, each rounded once; and
# ours, per value of `dim`: float32 sums of `dim` products (plus the normalisation and the few operations
# after). A neighbour leading another by twice the sum (2E) in our numbers leads it in C's.
_C_ERROR, _OUR_ERROR = 10, 7
# the sizes of S (in C's units) for which those bounds hold: far from float32's overflow and underflow
_SPAN = (2.0**-100, 2.0**100)
# `_least`'s packing of a neighbour's slot into the low bits of a float32 (widths up to 512)
_SLOT_BITS = np.int32(511)


def best_on_grid(
    lat: Lattice, codes: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray,
    values: np.ndarray | None = None, levels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Grid index `[..., T]` of groups `[...]` at `T` trial scales each (`codes [..., T]`, `scale`
    broadcastable to it, `xval`, `waux` `[dim, ...]`, `values` None, `[n_levels]` or `[n_levels, ...]` as
    for `best_neighbours`): a code on the grid gives its own point, a code off it the neighbour
    `best_neighbours` picks at that trial's scale. Also returns which entries were off the grid, and with
    `levels [..., T, dim]` (C-contiguous) writes the levels of the points those took there.

    A search at every trial is the kernels' cost; but a group keeps its code over several trials in a row
    (a *run*), and over a run the winner rarely changes. Per run, the neighbours' errors in real arithmetic
    are quadratics in the scale, computed for all of a run's neighbours at once as matrix products: where
    one wins by a margin over C's float32 rounding at both ends of the run, it wins throughout
    (`_run_winners`). Elsewhere each trial is looked at on its own, and only the neighbours within that
    margin of the least are computed as C computes them.
    """
    index = lat.index_of[codes]
    off = index < 0
    flat = np.flatnonzero(off)  # row-major: each group's trials in a row
    if flat.size == 0:
        return index, off
    n_trials = codes.shape[-1]
    group, trial = np.divmod(flat, n_trials)
    code = np.take(codes, flat)
    s = _entry_scales(scale, codes.shape, flat)
    with np.errstate(invalid="ignore"):
        falling = bool((np.asarray(scale)[..., 1:] <= np.asarray(scale)[..., :-1]).all())  # along the trials
    starts = np.ones(flat.size, dtype=bool)
    starts[1:] = (group[1:] != group[:-1]) | (trial[1:] != trial[:-1] + 1) | (code[1:] != code[:-1])
    first = np.flatnonzero(starts)
    shared = values is not None and values.ndim == 1  # the same level values for every group
    columns = [a.reshape(a.shape[0], -1) for a in (xval, waux) + ((values,) if values is not None else ())]

    def of(entries: np.ndarray) -> list[np.ndarray | None]:
        """`xval`, `waux`, `values` of the entries' groups, `[dim or n_levels, entries]`."""
        taken: list[np.ndarray | None] = [np.take(a, group[entries], axis=1) for a in columns[:2]]
        if values is None or shared:
            return [*taken, None if values is None else columns[2]]
        return [*taken, np.take(columns[2], group[entries], axis=1)]

    runs, sigma, run_of = _run_tables(lat, code[first], _Groups.of(*of(first)), s, first, falling)
    found, clear = _run_winners(runs, sigma, run_of)
    unclear = np.flatnonzero(~clear)
    if unclear.size:
        tabled = runs.bucket[run_of[unclear]] >= 0
        near = unclear[tabled]
        if near.size:
            candidates, owner = _near_least(runs, run_of[near], sigma[near])
            found[near] = _first_least(lat, candidates, owner, *of(near)[:2], s[near], of(near)[2])
        rest = unclear[~tabled]
        if rest.size:
            found[rest] = best_neighbours(lat, code[rest], *of(rest)[:2], s[rest], of(rest)[2])
    np.put(index, flat, found)
    if levels is not None:
        put_levels(lat, levels, flat, found)
    return index, off


def _entry_scales(scale: np.ndarray, shape: tuple[int, ...], flat: np.ndarray) -> np.ndarray:
    """The scale of entries `flat` of `codes` (`shape`), `scale` broadcastable to it."""
    scale = np.asarray(scale, dtype=F32)
    padded = (1,) * (len(shape) - scale.ndim) + scale.shape
    varies = next((i for i, d in enumerate(padded) if d != 1), len(shape))
    if padded[varies:] == shape[varies:]:  # scale spans codes' last axes: no need to broadcast it
        return np.take(np.ascontiguousarray(scale).reshape(-1), flat % scale.size)
    return np.take(np.ascontiguousarray(np.broadcast_to(scale, shape)), flat)


def put_levels(lat: Lattice, levels: np.ndarray, flat: np.ndarray, points: np.ndarray) -> None:
    """Write the levels of grid points `points` into rows `flat` of `levels [..., dim]` (C-contiguous)."""
    if not levels.flags.c_contiguous:
        raise ValueError("put_levels writes in place: `levels` must be C-contiguous")
    if flat.size:
        row = np.dtype((np.void, levels.itemsize * levels.shape[-1]))  # a group's levels as one item
        rows = np.ascontiguousarray(np.take(lat.levels, points, axis=0), dtype=levels.dtype)
        levels.reshape(-1, levels.shape[-1]).view(row)[flat, 0] = rows.view(row)[:, 0]


def value_major(levels: np.ndarray) -> np.ndarray:
    """Levels `[groups, n, ..., dim]` (a group's values in a row) to `[groups * dim, n, ...]` (value by
    value, as the kernels' blocks hold them)."""
    return np.moveaxis(levels, -1, 1).reshape(levels.shape[0] * levels.shape[-1], *levels.shape[1:-1])


def odd_sums(xval: np.ndarray, w: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sum(w*x*q)` and `sum(w*q*q)` over the values (`xval`, `w` `[size, n]`) of `levels [groups, n, T,
    dim]`, `q = 2l + 1`, in C's order: the products are written value by value, then summed row by row."""
    q = value_major(F32(2) * levels + F32(1))  # [size, n, T]
    wx, wq = np.empty(q.shape, dtype=F32), np.empty(q.shape, dtype=F32)
    np.multiply((w * xval)[:, :, None], q, out=wx)
    np.multiply(w[:, :, None], q, out=wq)
    wq *= q
    return sum_groups(wx), sum_groups(wq)


@dataclass
class _Groups:
    """Per run `[R, dim]` (the values of its group in a row): its values, its weights divided by their
    largest (with which the float32 search neither under- nor overflows), which weights are zero, and the
    level values (`[1 or R, n_levels]`; None: 2l+1)."""

    x: np.ndarray
    w: np.ndarray
    largest: np.ndarray  # [R]: the weight `w` is divided by
    zero: np.ndarray
    any_zero: np.ndarray
    values: np.ndarray | None

    @classmethod
    def of(cls, xval: np.ndarray, waux: np.ndarray, values: np.ndarray | None) -> _Groups:
        """From columns `[dim, R]` (values `[n_levels, 1 or R]`, or None)."""
        largest = np.maximum.reduce(waux, axis=0)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            normal = (waux / largest).T.astype(F32)
        zero = waux == 0
        table = None if values is None else np.ascontiguousarray(values.T, dtype=F32)
        return cls(np.ascontiguousarray(xval.T, dtype=F32), normal, largest, zero.T, zero.any(axis=0), table)


@dataclass
class _Runs:
    """Per run (a group, a code, trials in a row), in scale units of the run's largest scale (so that
    float32 neither under- nor overflows): each neighbour's A and B of `d2 = s^2 A - 2 s B + C` (real
    arithmetic; A = sum(w q^2), B = sum(w x q), weights divided by their largest), in the bucket tables
    of the run's code, and the run's rounding bound E."""

    lat: Lattice
    codes: np.ndarray  # [R]
    bucket: np.ndarray  # [R]: the bucket of each run's code
    local: np.ndarray  # [R]: the run's row in its bucket's `a`, `b`
    a: list[np.ndarray]  # per bucket [width, runs there]
    b: list[np.ndarray]
    pad: list[np.ndarray]
    # per bucket [width, runs there]: each neighbour's code with the values of zero weight masked out,
    # where a run has such values (neighbours that differ only there tie exactly in C: one candidate)
    classes: list[np.ndarray | None]
    bound: np.ndarray  # [R]

    def grid_index(self, runs: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The grid index of slot `slots` of runs `runs`."""
        return self.lat.flat_neighbours[self.lat.flat_base[self.codes[runs]] + slots]


def _runs(lat: Lattice, codes: np.ndarray, groups: _Groups, s_hi: np.ndarray, sound: np.ndarray) -> _Runs:
    """Each run's neighbours' A and B (one batched matrix product per bucket), its values in units of its
    largest scale, and its bound E (runs that are not `sound`, or whose E does not hold, get no tables)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = groups.x / s_hi[:, None]
        sound &= np.isfinite(np.einsum("rd,rd->r", groups.w, x))
    bucket, local = lat.bucket_of[codes].astype(np.intp), np.zeros(codes.size, dtype=np.intp)
    bucket[~sound] = -1
    bound = np.zeros(codes.size, dtype=F32)
    tables: list[list[np.ndarray | None]] = [[], [], [], []]
    members = []
    for k, table in enumerate(lat.buckets):
        runs = np.flatnonzero(bucket == k)
        members.append(runs)
        rows = np.take(lat.row_of, np.take(codes, runs))
        wr, xr = np.take(groups.w, runs, axis=0), np.take(x, runs, axis=0)
        q, largest = _neighbour_values(table, rows, groups, runs)
        a = np.matmul(q * q, wr[:, :, None])[:, :, 0].T.copy()
        b = np.matmul(q, (wr * xr)[:, :, None])[:, :, 0].T.copy()
        bound[runs] = _bound(lat, wr, largest + np.abs(xr), np.take(groups.largest, runs), np.take(s_hi, runs))
        classes = _tie_classes(lat, table, rows, groups, runs)
        for part, value in zip(tables, (a, b, np.take(table.pad, rows, axis=1), classes), strict=True):
            part.append(value)
    for k, runs in enumerate(members):  # runs whose bound does not hold leave the tables
        keep = np.isfinite(bound[runs])
        if not keep.all():
            bucket[runs[~keep]] = -1
            for part in tables:
                if part[k] is not None:
                    part[k] = part[k][:, keep]
        local[runs[keep]] = np.arange(int(keep.sum()))
    return _Runs(lat, codes, bucket, local, *tables, bound)  # type: ignore[arg-type]


def _neighbour_values(table: Bucket, rows: np.ndarray, groups: _Groups, runs: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The values q of the neighbours of runs `runs` (table rows `rows`), `[runs, width, dim]`, and the
    largest |q| of each value over them, `[runs, dim or 1]`."""
    if groups.values is None:
        return np.take(table.odd, rows, axis=0).astype(F32), np.take(table.odd_max, rows, axis=0)
    n_levels = groups.values.shape[1]
    run_values = groups.values if groups.values.shape[0] == 1 else np.take(groups.values, runs, axis=0)
    step = run_values[:, 1:] - run_values[:, :-1]
    if (step == step[:, :1]).all():  # evenly spaced (IQ1's are): q = v0 + step * l
        q = run_values[:, :1, None] + step[:, :1, None] * np.take(table.levels, rows, axis=0).astype(F32)
    else:
        levels = np.take(table.levels, rows, axis=0).astype(np.intp)
        q = np.take(run_values, levels + n_levels * np.arange(run_values.shape[0])[:, None, None])
    return q, np.abs(run_values).max(axis=1)[:, None]


def _bound(lat: Lattice, w: np.ndarray, reach: np.ndarray, w_unit: np.ndarray, s_hi: np.ndarray) -> np.ndarray:
    """E of runs with normalised weights `w` and `reach` = |q| + |x| `[runs, dim]` at their largest scale
    (inf where C's float32 terms could over- or underflow, so that the bound does not hold); `w_unit`,
    `s_hi`: the weight and scale units (`_Groups`)."""
    dim = lat.levels.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.einsum("rd,rd->r", w, reach * reach)
        in_units = s_hi.astype(np.float64)
        span = spread.astype(np.float64) * w_unit * in_units * in_units  # S in C's units
        reach_max = np.maximum.reduce(reach, axis=1, initial=0).astype(np.float64) * in_units
    safe = (span >= _SPAN[0]) & (span <= _SPAN[1]) & (reach_max <= _SPAN[1])
    return np.where(safe, F32((_C_ERROR + _OUR_ERROR + dim) * 2.0**-24) * spread, F32(np.inf))


def _tie_classes(lat: Lattice, table: Bucket, rows: np.ndarray, groups: _Groups, runs: np.ndarray
                 ) -> np.ndarray | None:
    """`_Runs.classes` of runs `runs` (None if none has a zero weight)."""
    zero_runs = np.flatnonzero(np.take(groups.any_zero, runs))
    if zero_runs.size == 0:
        return None
    dim = lat.levels.shape[1]
    kept = np.full((runs.size, dim), (1 << lat.bits) - 1, dtype=np.int32)
    kept[zero_runs] = np.where(np.take(groups.zero, runs[zero_runs], axis=0), 0, kept[zero_runs])
    mask = (kept << (lat.bits * np.arange(dim, dtype=np.int32))).sum(axis=1, dtype=np.int32)
    return (lat.point_codes[np.take(table.neighbours, rows, axis=0)] & mask[:, None]).T.copy()


def _run_tables(
    lat: Lattice, codes: np.ndarray, groups: _Groups, s: np.ndarray, first: np.ndarray, falling: bool,
) -> tuple[_Runs, np.ndarray, np.ndarray]:
    """The tables of runs `[R]` (codes, their groups; each run's entries start at `first`), each entry's
    scale in units of its run's largest, `sigma`, and its run. The scales of a run must not increase from
    one entry to the next (`falling`: known; else checked, and a run where they do gets no tables)."""
    last = np.append(first[1:], s.size) - 1
    s_hi = s[first]
    sound = (s[last] > 0) & np.isfinite(s_hi)
    if not falling:
        rising = np.zeros(s.size, dtype=bool)
        rising[1:] = s[1:] > s[:-1]
        rising[first] = False
        sound &= np.add.reduceat(rising, first) == 0
    length = last - first + 1
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        sigma = s / np.repeat(s_hi, length)  # 1 at each run's first entry
    return _runs(lat, codes, groups, s_hi, sound), sigma, np.repeat(np.arange(codes.size), length)


def _run_winners(runs: _Runs, sigma: np.ndarray, run_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each entry's winner, where its run settles it (else: unclear).

    C's float32 `d2` (the same float32 inputs; products, a difference and four or eight sums, each rounded
    once) is within `10 u S` of the real one (S = sum(w (s q + |x|)^2)), and the values here within a
    little more: E (`_C_ERROR`, `_OUR_ERROR`). In real arithmetic `(d2_n - d2_b) / s` is linear in s: if
    n trails b by more than 2E at the low end u of a range of scales, and by more than 2E v / u at its
    high end v, it trails by more than 2E throughout, and C never takes it over b. A run is settled when
    one neighbour wins at both ends and every other trails it so; or when, split where the lines of the two
    winners at its ends cross, each of them leads every other neighbour so on its side: then at each trial
    the one of the two that leads the other by 2E wins.
    """
    low = sigma[np.append(np.flatnonzero(run_of[1:] != run_of[:-1]), run_of.size - 1)]  # each run's last
    n_runs = runs.codes.size
    state = np.zeros(n_runs, dtype=np.int8)  # 0 unsettled, 1 one winner, 2 two
    winner, second = np.zeros(n_runs, dtype=np.int32), np.zeros(n_runs, dtype=np.int32)
    gap_a, gap_b = np.zeros(n_runs, dtype=F32), np.zeros(n_runs, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for k, (a, b, pad, classes) in enumerate(zip(runs.a, runs.b, runs.pad, runs.classes, strict=True)):
            here = np.flatnonzero(runs.bucket == k)  # the bucket's table columns, in order
            if here.size == 0:
                continue
            u, two_bound = low[here], F32(2) * runs.bound[here]
            d2_hi, d2_lo = a - F32(2) * b + pad, (u * a - F32(2) * b) * u + pad
            (top, lead_hi), (bottom, lead_lo) = _least(d2_hi, classes), _least(d2_lo, classes)
            winner[here] = runs.grid_index(here, top)
            same = top == bottom
            state[here[same & (lead_lo > two_bound) & (lead_hi * u > two_bound)]] = 1
            moving = np.flatnonzero(~same)
            if moving.size == 0:
                continue
            m = np.arange(moving.size)
            tables = [np.take(t, moving, axis=1) for t in (a, b, pad)]
            at_hi, at_lo = top[moving] * moving.size + m, bottom[moving] * moving.size + m
            gaps = [np.take(t, at_hi) - np.take(t, at_lo) for t in tables[:2]]
            mid = np.clip(np.nan_to_num(F32(2) * gaps[1] / gaps[0], nan=1.0), u[moving], F32(1)).astype(F32)
            d2_mid = (mid * tables[0] - F32(2) * tables[1]) * mid + tables[2]
            ok = _two_winners(np.take(d2_hi, moving, axis=1), d2_mid, np.take(d2_lo, moving, axis=1),
                              top[moving], bottom[moving], mid, u[moving], two_bound[moving],
                              None if classes is None else np.take(classes, moving, axis=1))
            two = here[moving[ok]]
            state[two] = 2
            second[two] = runs.grid_index(two, bottom[moving[ok]])
            gap_a[two], gap_b[two] = gaps[0][ok], gaps[1][ok]
    found = np.take(winner, run_of)
    entry_state = np.take(state, run_of)
    clear = entry_state == 1
    two = np.flatnonzero(entry_state == 2)
    if two.size:
        r, sg = np.take(run_of, two), np.take(sigma, two)
        with np.errstate(over="ignore", invalid="ignore"):
            diff = (sg * np.take(gap_a, r) - F32(2) * np.take(gap_b, r)) * sg  # the winner's d2 - the second's
        np.put(found, two, np.where(diff > 0, np.take(second, r), np.take(found, two)))
        np.put(clear, two, np.abs(diff) > F32(2) * np.take(runs.bound, r))
    return found, clear


def _near_least(runs: _Runs, run: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For entries of runs `run` (with tables) at scales `sigma`: their neighbours within 2E of the least
    there (C's choice is among them: any other is larger in C than each of those), as candidate grid
    points, and each one's entry (entries in order, each one's candidates in list order)."""
    points, owner = [], []
    bucket = runs.bucket[run]
    with np.errstate(over="ignore", invalid="ignore"):
        for k in np.flatnonzero(np.bincount(bucket, minlength=len(runs.a))):
            sel = np.flatnonzero(bucket == k)
            rows = runs.local[run[sel]]
            sg = sigma[sel]
            a, b, pad = (np.take(t, rows, axis=1) for t in (runs.a[k], runs.b[k], runs.pad[k]))
            d2 = (sg * a - F32(2) * b) * sg + pad
            least = np.minimum.reduce(d2, axis=0)  # not a number if any is: then every neighbour stays
            near = (d2 - least <= F32(2) * runs.bound[run[sel]]) | ~np.isfinite(least)
            entry, slot = np.nonzero(near.T)  # by entry, then slot (list order)
            points.append(runs.grid_index(run[sel][entry], slot))
            owner.append(sel[entry])
    points_all, owner_all = np.concatenate(points), np.concatenate(owner)
    order = np.argsort(owner_all, kind="stable")
    return points_all[order], owner_all[order]


def _least(d2: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `d2 [width, m]`: the slot of the least value (the first on ties) and its lead over the
    runner-up of another tie class (+inf for a single neighbour; 0 for a tie; negative: unsure).

    Tables are neighbour-major: numpy reduces across rows far faster than along short ones. The least is
    found with each value's last 9 bits replaced by its slot, so that one reduction gives both; should that
    pick a value that is not the least, its lead, from the exact values, comes out negative."""
    least = np.minimum.reduce(d2, axis=0)
    key = ((d2 - least).view(np.int32) & ~_SLOT_BITS) | np.arange(d2.shape[0], dtype=np.int32)[:, None]
    slot = np.minimum.reduce(key, axis=0) & _SLOT_BITS
    flat = slot * d2.shape[1] + np.arange(d2.shape[1])
    value = np.take(d2, flat)
    if classes is None:
        np.put(d2, flat, np.inf)
        runner_up = np.minimum.reduce(d2, axis=0)
        np.put(d2, flat, value)
    else:  # `_Runs.classes`: neighbours C cannot tell apart count as one
        runner_up = np.minimum.reduce(np.where(classes == np.take(classes, flat), F32(np.inf), d2), axis=0)
    return slot, runner_up - value


def _two_winners(
    d2_hi: np.ndarray, d2_mid: np.ndarray, d2_lo: np.ndarray, w_hi: np.ndarray, w_lo: np.ndarray,
    mid: np.ndarray, lo: np.ndarray, two_bound: np.ndarray, classes: np.ndarray | None,
) -> np.ndarray:
    """Per run (column of `d2_* [width, m]` at scales 1, `mid` and `lo`): whether the winner at 1 leads
    every other neighbour by 2E on [mid, 1] and the winner at `lo` does on [lo, mid]."""
    n = np.arange(d2_hi.shape[1])
    ok = np.ones(d2_hi.shape, dtype=bool)
    for slot, (top, top_d2), (bottom, bottom_d2) in ((w_hi, (F32(1), d2_hi), (mid, d2_mid)),
                                                      (w_lo, (mid, d2_mid), (lo, d2_lo))):
        flat = slot * d2_hi.shape[1] + n
        trails = ((bottom_d2 - np.take(bottom_d2, flat)) > two_bound) & \
            ((top_d2 - np.take(top_d2, flat)) * bottom > two_bound * top)
        trails[w_hi, n] = trails[w_lo, n] = True
        if classes is not None:  # C takes the first of a tie class, the winner
            trails |= classes == np.take(classes, flat)
        ok &= trails
    return np.logical_and.reduce(ok, axis=0)
