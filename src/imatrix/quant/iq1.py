"""1-bit lattice types IQ1_S (32-value sub-blocks) and IQ1_M (16-value sub-blocks), 256-value super-blocks,
bit-compatible with llama.cpp's `quantize_row_iq1_s_impl` and `quantize_row_iq1_m_impl`.

Values are ternary, `scale * (l - 1 + delta)` with levels l in {0, 1, 2} and a shift `delta = ±1/8`; each
group of 8 levels is one point of a 2048-point grid (gguf-py's, `grids.py`). Within a sub-block the best
split of the sorted values into the three levels is found exhaustively (every pair of cut points, both
shifts, from prefix sums), then a group off the grid takes its best neighbour and the scale is refitted.
IQ1_M picks the shift per 8 values (four sign combinations per sub-block) and finally refits its fp16
super-block scale over all 256 values.

Implementation-defined in C: the sort. llama.cpp sorts (value, index) pairs with `qsort` and a comparator
that looks at the value only, so the order of equal values is the C library's. It matters: tied values
enter the prefix sums in that order (different float rounding) and a cut may fall between them; in IQ1_M
both halves of a sub-block share one sorted order but may take different shifts, so the order of equal
values from different halves decides which splits exist at all. glibc's qsort sorts such small arrays
with a merge sort, which keeps ties in index order: that is what the llama-quantize built here does
(glibc 2.36; the goldens match it) and what `sort_order` does. Other qsorts (musl's, BSD's, MSVC's) are
not stable. Measured on the shared SmolLM2
source (tie-heavy: its rows repeat values), sorting ties in reverse index order instead changes 85% of
IQ1_M's super-blocks and 0.02% of IQ1_S's; on tie-free (e.g. Gaussian float32) rows, none. So under a C
library with another qsort, llama-quantize's IQ1 bytes may differ from ours wherever a sub-block has ties.

llama-quantize requires an imatrix for both (but IQ1_M on token_embd / output, whose kernel then weighs by
x^2); `quantize_iq1_s` asserts one, so IQ1_S refuses to run without.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from imatrix.errors import ImatrixError
from imatrix.quant.base import QuantType
from imatrix.quant.blocks import F32, fp16_bytes, nearest, steps, sum_groups
from imatrix.quant.grids import Lattice, best_on_grid, lattice
from imatrix.quant.kquants import imatrix_weights

Q = gguf.GGMLQuantizationType
QK_K = 256
GROUP = 8  # values per grid point
DELTA = F32(0.125)  # IQ1S_DELTA = IQ1M_DELTA
# level values with a positive / negative shift (x_p / x_m in ggml-quants.c)
SHIFTED = {1: np.array([-1, 0, 1], dtype=F32) + DELTA, -1: np.array([-1, 0, 1], dtype=F32) - DELTA}
# relative margin below a column's best score under which a candidate is skipped (`best_candidate`)
NEAR_RECORD = 1e-3
# Super-blocks per step: `blocks.steps` with this many copies (a sub-block's candidate sums hold ~20-35
# values per input value; larger steps amortise the candidate scan's per-candidate overhead)
STEP_COPIES = 16


def weights_of(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Per-value weights of super-blocks `x [n, 256]`: `qw*sqrt(sigma2 + x^2)` with an imatrix, else `x^2`."""
    return x * x if qw is None else imatrix_weights(x, qw, 2.0)


def grid() -> Lattice:
    """The IQ1 grid with neighbours over its 3 nearest distances (`iq2xs_init_impl` for IQ1_S / IQ1_M)."""
    return lattice(Q.IQ1_S, 3)


@dataclass
class Split:
    """The exhaustive search of a sub-block: levels `[size, n]`, scale `[n]`, the winning combination
    `[n]` (-1: none, the sub-block stays empty), and which sub-blocks found one."""

    levels: np.ndarray
    scale: np.ndarray
    combo: np.ndarray
    found: np.ndarray


# ----------------------------------------------------------------------------- sorted prefix sums


def sort_order(x: np.ndarray) -> np.ndarray:
    """Per column of `x [size, n]`, the indices sorting it ascending, equal values in index order (glibc's
    qsort here; implementation-defined in C, see the module docstring)."""
    return np.argsort(x, axis=0, kind="stable")


def sorted_prefix_sums(x: np.ndarray, w: np.ndarray, part: np.ndarray | None = None
                       ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Values `x [size, n]` sorted per column (stable, see the module docstring): the order and, per part
    of the sub-block (`part [size]` names each value's part; None: one part), the prefix sums of `w*x`
    and of `w` over the sorted values from 0.0f, `[size+1, n]` each (C's `sumx` / `sumw`, `px` / `pw`)."""
    order = sort_order(x)
    wx = np.take_along_axis(w * x, order, axis=0)
    ws = np.take_along_axis(w, order, axis=0)
    parts = [None] if part is None else sorted(set(part.tolist()))
    sums_x, sums_w = [], []
    for p in parts:
        # values of other parts add nothing: C copies the previous sum, adding +0.0 is the same
        member = True if p is None else part[order] == p
        zero = np.zeros((1, x.shape[1]), dtype=F32)
        sums_x.append(np.cumsum(np.concatenate([zero, np.where(member, wx, F32(0))]), axis=0, dtype=F32))
        sums_w.append(np.cumsum(np.concatenate([zero, np.where(member, ws, F32(0))]), axis=0, dtype=F32))
    return order, sums_x, sums_w


def cut_pairs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All (i1, i2) with 0 <= i1 <= i2 <= size in C's loop order."""
    i1, i2 = np.triu_indices(size + 1)
    return i1, i2


def split_levels(order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Levels `[size, n]`: a value's rank in the sorted order below i1 gives 0, below i2 gives 1, else 2."""
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[0])[:, None], axis=0)
    return ((rank >= i1).astype(F32) + (rank >= i2).astype(F32)).astype(F32)


def best_candidate(sumqx: np.ndarray, sumq2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's scan over candidates `[k, n]` in order, from best = -FLT_MAX: a candidate is taken when
    `sumq2 > 0 && sumqx^2 > best*sumq2` (best becomes `sumqx/sumq2*sumqx`). Returns the last taken
    index (-1: none) and its scale.

    Only the last one taken matters, and it scores within a few ulps of the column's best score (once the
    best is reached nothing clearly below it is taken again). Candidates clearly below that (`NEAR_RECORD`)
    cannot be it, nor change what happens among the others: the first of those near the top is taken
    whatever came before. So the exact scan runs over those few per column only.
    """
    n = sumqx.shape[1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        score = np.where(sumq2 > 0, sumqx / sumq2 * sumqx, -np.inf).astype(F32)
        top = np.maximum.reduce(score, axis=0)
        near = (sumq2 > 0) & ~(score < top * F32(1 - NEAR_RECORD))
    cand, col = np.nonzero(near)
    order = np.argsort(col, kind="stable")  # by column, then candidate order
    cand, col = cand[order], col[order]
    counts = np.bincount(col, minlength=n)
    slot = np.arange(col.size) - np.repeat(np.cumsum(counts) - counts, counts)
    width = int(counts.max()) if col.size else 0
    qxs, q2s = np.zeros((width, n), dtype=F32), np.zeros((width, n), dtype=F32)  # q2 = 0: never taken
    index = np.full((width, n), -1)
    flat = cand * n + col
    qxs[slot, col], q2s[slot, col], index[slot, col] = np.take(sumqx, flat), np.take(sumq2, flat), cand
    best = np.full(n, -np.finfo(F32).max, dtype=F32)
    taken = np.full(n, -1)
    scale = np.zeros(n, dtype=F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k in range(width):
            qx, q2 = qxs[k], q2s[k]
            better = (q2 > 0) & (qx * qx > best * q2)
            scale = np.where(better, qx / np.where(better, q2, F32(1)), scale)
            best = np.where(better, scale * qx, best)
            taken = np.where(better, index[k], taken)
    return taken, scale


# ----------------------------------------------------------------------------- grid points


def snap_to_grid(
    levels: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices `[size/8, n]` of the levels `[size, n]`; a group off the grid takes the neighbour
    nearest at `scale` with its level `values [3, size/8, n]` (`iq1_find_best_neighbour2`, weights `w`
    unsquared). Returns the indices and which groups were off."""
    lat = grid()
    n_groups = levels.shape[0] // GROUP
    codes = lat.codes_of(levels.reshape(n_groups, GROUP, -1), axis=1)  # [n_groups, n]
    by_value = [np.moveaxis(a.reshape(n_groups, GROUP, -1), 1, 0) for a in (x, w)]  # [8, n_groups, n]
    index, off = best_on_grid(lat, codes[..., None], *by_value, scale[:, None], values)
    return index[..., 0], off[..., 0]


def grid_fit(index: np.ndarray, x: np.ndarray, w: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sum(w*q*x)` and `sum(w*q*q)` over a sub-block's values in order, q the grid points' level values."""
    q = grid_values(index, values)
    wq = w * q
    return sum_groups(wq * x), sum_groups(wq * q)


def grid_values(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Value of each level of grid points `index [g, n]` given level values `[3, g, n]`: `[g*8, n]`."""
    levels = grid().levels[index].astype(np.intp)  # [g, n, 8]
    picked = np.take_along_axis(values[:, :, :, None], levels[None], axis=0)[0]  # [g, n, 8]
    return np.moveaxis(picked, 2, 1).reshape(-1, index.shape[1])


def refit_scale(scale: np.ndarray, off: np.ndarray, index: np.ndarray, x: np.ndarray, w: np.ndarray,
                values: np.ndarray) -> np.ndarray:
    """Where a group went off the grid: the scale refitted to the grid points, if both sums are positive."""
    cols = np.flatnonzero(off.any(axis=0))
    if cols.size == 0:
        return scale
    sumqx, sumq2 = grid_fit(index[:, cols], x[:, cols], w[:, cols], values[:, :, cols])
    ok = (sumqx > 0) & (sumq2 > 0)
    scale = scale.copy()
    scale[cols[ok]] = sumqx[ok] / sumq2[ok]
    return scale


def group_values(sign_of_group: np.ndarray) -> np.ndarray:
    """Level values `[3, g, n]` for shift signs `[g, n]` (+1 / -1)."""
    return np.where(sign_of_group[None] > 0, SHIFTED[1][:, None, None], SHIFTED[-1][:, None, None]).astype(F32)


def scale_codes(scale: np.ndarray, d: np.ndarray) -> np.ndarray:
    """3-bit code of each sub-block scale `[n, k]` against super-block steps `d [n]`."""
    inv = F32(1) / d
    return np.clip(nearest(F32(0.5) * (inv[:, None] * scale - F32(1))), 0, 7).astype(np.int64)


# ----------------------------------------------------------------------------- IQ1_S


def iq1s_split(x: np.ndarray, w: np.ndarray) -> Split:
    """Best (i1, i2, shift) of each 32-value sub-block `[32, n]`: candidates (i1, i2) in C's order, each
    with the positive shift, then the negative one."""
    size = x.shape[0]
    order, (sumx,), (sumw,) = sorted_prefix_sums(x, w)
    i1, i2 = cut_pairs(size)
    parts_x = (sumx[i1] - sumx[0], sumx[i2] - sumx[i1], sumx[size] - sumx[i2])
    parts_w = (sumw[i1] - sumw[0], sumw[i2] - sumw[i1], sumw[size] - sumw[i2])
    sumqx, sumq2 = [], []
    for sign in (1, -1):
        v = SHIFTED[sign]
        sumqx.append(parts_x[0] * v[0] + parts_x[1] * v[1] + parts_x[2] * v[2])
        sumq2.append(parts_w[0] * v[0] * v[0] + parts_w[1] * v[1] * v[1] + parts_w[2] * v[2] * v[2])
    # candidate 2*pair + (0: positive shift, 1: negative)
    n = x.shape[1]
    taken, scale = best_candidate(np.stack(sumqx, 1).reshape(-1, n), np.stack(sumq2, 1).reshape(-1, n))
    pair = np.maximum(taken, 0) // 2
    levels = split_levels(order, i1[pair], i2[pair])
    return Split(levels, scale, np.where(taken >= 0, taken % 2, -1), taken >= 0)


class IQ1_S(QuantType, qtype=Q.IQ1_S):
    SUB = 32

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        if weights is None:  # quantize_iq1_s asserts quant_weights
            raise ImatrixError("IQ1_S needs an importance matrix (llama.cpp's kernel has no weights of its own)")
        return np.concatenate([cls._step(blocks[part], weights[part])
                               for part in steps(blocks.shape[0], QK_K, copies=STEP_COPIES)], axis=0)

    @classmethod
    def _step(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        n, n_sub = blocks.shape[0], QK_K // cls.SUB
        x = np.asarray(blocks, dtype=F32)
        w = weights_of(x, np.asarray(qw, dtype=F32))
        xs, ws = (np.ascontiguousarray(a.reshape(-1, cls.SUB).T) for a in (x, w))
        live = np.abs(xs).max(axis=0) >= F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
        split = _empty_split(xs)
        cols = np.flatnonzero(live)
        if cols.size:
            _fill(split, cols, iq1s_split(xs[:, cols], ws[:, cols]))
        # a negative best scale: C mirrors the levels and the shift
        flip = split.scale < 0
        split.levels = np.where(flip, F32(2) - split.levels, split.levels)
        sign = np.where(split.combo == 0, 1, -1) * np.where(flip, -1, 1)
        scale = np.abs(split.scale)
        values = group_values(np.broadcast_to(sign, (cls.SUB // GROUP, sign.size)))
        index, off = snap_to_grid(split.levels, xs, ws, scale, values)
        scale = refit_scale(scale, off, index, xs, ws, values)
        stored = split.found  # a sub-block without a split stores nothing but its (zero) scale code
        scale = np.where(stored, scale, F32(0))
        sign = np.where(stored, sign, 1)
        index = np.where(stored, index, 0).T.reshape(n, n_sub, -1)
        return cls._pack(index, scale.reshape(n, n_sub), sign.reshape(n, n_sub))

    @staticmethod
    def _pack(index: np.ndarray, scale: np.ndarray, sign: np.ndarray) -> np.ndarray:
        n = index.shape[0]
        max_scale = scale.max(axis=1)
        live = max_scale > 0
        d = np.where(live, max_scale / F32(15), F32(1))
        codes = np.where(live[:, None], scale_codes(scale, d), 0)
        high = ((index >> 8).astype(np.int64) << (3 * np.arange(index.shape[2]))).sum(axis=2)
        qh = high | np.where(live[:, None], (codes | np.where(sign < 0, 8, 0)) << 12, 0)
        d_bytes = fp16_bytes(np.where(live, d * F32(1.125), F32(0)))
        qs = (index & 0xFF).astype(np.uint8).reshape(n, -1)
        return np.concatenate([d_bytes, qs, qh.astype("<u2").view(np.uint8).reshape(n, -1)], axis=1)


def _empty_split(xs: np.ndarray) -> Split:
    n = xs.shape[1]
    return Split(np.ones(xs.shape, dtype=F32), np.zeros(n, dtype=F32), np.full(n, -1), np.zeros(n, dtype=bool))


def _fill(split: Split, cols: np.ndarray, found: Split) -> None:
    split.levels[:, cols] = found.levels
    split.scale[cols] = found.scale
    split.combo[cols] = found.combo
    split.found[cols] = found.found


# ----------------------------------------------------------------------------- IQ1_M

# combination k of the shifts of a 16-value sub-block's two halves: 0 (+,+), 1 (+,-), 2 (-,+), 3 (-,-)
COMBO_SIGNS = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])
# the bits of qh that carry a combination's two shifts (bit 3: first 8 values, bit 7: second 8)
COMBO_MASKS = np.array([0x00, 0x80, 0x08, 0x88])


def iq1m_split(x: np.ndarray, w: np.ndarray) -> Split:
    """Best (i1, i2, combination) of each 16-value sub-block `[16, n]`, from prefix sums kept per half
    (the closed forms of `quantize_row_iq1_m_impl`: with level steps of 1, a split's sums need only the
    prefix sums at the two cuts)."""
    size = x.shape[0]
    order, px, pw = sorted_prefix_sums(x, w, np.arange(size) // (size // 2))
    i1, i2 = cut_pairs(size)
    p, m = SHIFTED[1], SHIFTED[-1]
    cp1, cp2 = p[0] * p[0] - p[1] * p[1], p[1] * p[1] - p[2] * p[2]
    cm1, cm2 = m[0] * m[0] - m[1] * m[1], m[1] * m[1] - m[2] * m[2]
    qx, q2 = [], []  # per half: {sign: sums [pairs, n]}
    for h in range(2):
        total_x, total_w = px[h][size], pw[h][size]
        sx = px[h][i1] + px[h][i2]
        qx.append({1: total_x * p[2] - sx, -1: total_x * m[2] - sx})
        q2.append({1: total_w * p[2] * p[2] + pw[h][i1] * cp1 + pw[h][i2] * cp2,
                   -1: total_w * m[2] * m[2] + pw[h][i1] * cm1 + pw[h][i2] * cm2})
    sumqx = np.stack([qx[0][a] + qx[1][b] for a, b in COMBO_SIGNS], 1).reshape(-1, x.shape[1])
    sumq2 = np.stack([q2[0][a] + q2[1][b] for a, b in COMBO_SIGNS], 1).reshape(-1, x.shape[1])
    taken, scale = best_candidate(sumqx, sumq2)
    pair = np.maximum(taken, 0) // 4
    levels = split_levels(order, i1[pair], i2[pair])
    return Split(levels, scale, np.where(taken >= 0, taken % 4, -1), taken >= 0)


class IQ1_M(QuantType, qtype=Q.IQ1_M):
    SUB = 16

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        return np.concatenate([cls._step(blocks[part], None if weights is None else weights[part])
                               for part in steps(blocks.shape[0], QK_K, copies=STEP_COPIES)], axis=0)

    @classmethod
    def _step(cls, blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        n, n_sub = blocks.shape[0], QK_K // cls.SUB
        x = np.asarray(blocks, dtype=F32)
        w = weights_of(x, None if qw is None else np.asarray(qw, dtype=F32))
        xs, ws = (np.ascontiguousarray(a.reshape(-1, cls.SUB).T) for a in (x, w))
        live = np.abs(xs).max(axis=0) >= F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
        split = _empty_split(xs)
        cols = np.flatnonzero(live)
        if cols.size:
            _fill(split, cols, iq1m_split(xs[:, cols], ws[:, cols]))
        # a negative best scale: C mirrors the levels and both shifts (combination k becomes 3 - k)
        flip = split.scale < 0
        split.levels = np.where(flip, F32(2) - split.levels, split.levels)
        combo = np.where(split.found, np.where(flip, 3 - split.combo, split.combo), 0)
        values = group_values(COMBO_SIGNS[combo].T)
        index, off = snap_to_grid(split.levels, xs, ws, np.abs(split.scale), values)
        scale = refit_scale(np.abs(split.scale), off, index, xs, ws, values)
        scale = np.where(split.found, scale, F32(0))
        index = np.where(split.found, index, 0)
        return cls._pack(index, scale.reshape(n, n_sub), combo.reshape(n, n_sub), xs, ws)

    @classmethod
    def _pack(cls, index: np.ndarray, scale: np.ndarray, combo: np.ndarray, xs: np.ndarray, ws: np.ndarray
              ) -> np.ndarray:
        """Bytes of super-blocks: grid indices `[2, n*16]`, sub-block scales and combinations `[n, 16]`,
        and the values and weights `[16, n*16]` the final super-block scale is fitted to."""
        n, n_sub = scale.shape
        max_scale = scale.max(axis=1)
        live = max_scale > 0
        d = np.where(live, max_scale / F32(15), F32(1))
        codes = np.where(live[:, None], scale_codes(scale, d), 0)
        # the super-block scale refitted to every value with its stored 3-bit sub-block scale
        steps_of = (F32(2) * codes.reshape(-1) + F32(1)).astype(F32)  # 2l+1 of each sub-block's 3-bit scale
        q = grid_values(index, group_values(COMBO_SIGNS[combo.reshape(-1)].T)) * steps_of
        wq = (ws * q).T.reshape(n, -1).T  # value order of the super-block, [256, n]
        sumqx = sum_groups(wq * xs.T.reshape(n, -1).T)
        sumq2 = sum_groups(wq * q.T.reshape(n, -1).T)
        d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), d)
        d_bits = fp16_bytes(d * F32(1.1125)).view("<u2")[:, 0].astype(np.int64)
        high = index.T.reshape(n, n_sub, 2) >> 8
        qh = high[:, :, 0] | (high[:, :, 1] << 4) | np.where(live[:, None], COMBO_MASKS[combo], 0)
        packed = (codes.reshape(n, 4, 4) << (3 * np.arange(4))).sum(axis=2)
        packed |= ((d_bits[:, None] >> (4 * np.arange(4))) & 0xF) << 12
        packed = np.where(live[:, None], packed, 0)
        qs = (index.T & 0xFF).astype(np.uint8).reshape(n, -1)
        return np.concatenate([qs, qh.astype(np.uint8), packed.astype("<u2").view(np.uint8).reshape(n, -1)], axis=1)
