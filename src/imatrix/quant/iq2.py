"""2-bit lattice types IQ2_XXS, IQ2_XS and IQ2_S (256-value super-blocks), bit-compatible with llama.cpp's
`quantize_row_iq2_xxs_impl`, `quantize_row_iq2_xs_impl` and `quantize_row_iq2_s_impl`.

Every group of 8 values is stored as signs plus one point of a grid of 8-vectors with levels {0, 1, 2}
(value `(2 * level + 1) * scale`): 256 points for IQ2_XXS, 512 for IQ2_XS, 1024 for IQ2_S (gguf-py ships
the grids). Each sub-block (32 values for IQ2_XXS, 16 otherwise) searches its scale over a dozen or so
candidates; for each, a group whose rounded levels are not a grid point takes the best of that point's
neighbours on the grid (the neighbour lists are built once, as `iq2xs_init_impl` builds them). All
candidates are rounded at once and their neighbour searches done together (`grids.best_on_grid`). The
sub-block scales are finally stored as 4-bit multiples of one fp16 super-block scale.

IQ2_XXS and IQ2_XS keep 7 sign bits per group: an odd number of negative values flips the value that
matters least, which then takes part in the search as a negative value. IQ2_XXS's first guess of a
scale comes from `make_qp_quants`, which stores levels in `uint8_t`, so such a negative value's level
wraps around (a -1 reads back as 255) in its refinement: `_qp_scale` does the same.

llama.cpp asserts in `quantize_iq2_xxs` / `quantize_iq2_xs` without an imatrix (`ggml_quantize_chunk`),
so those kernels refuse; IQ2_S has its own weights without one.

Nothing here is implementation-defined in C: the neighbour lists are sorted by distance, then grid index,
and every search keeps the first best candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from imatrix.errors import ImatrixError
from imatrix.quant import grids
from imatrix.quant.base import QuantType
from imatrix.quant.blocks import (
    F32,
    GROUP_MAX_EPS,
    fp16_bytes,
    from_groups,
    nearest,
    nearest_exact,
    steps,
    sum_groups,
    to_groups,
)
from imatrix.quant.grids import Lattice, best_on_grid, odd_sums, put_levels, value_major
from imatrix.quant.kquants import block_sigma2
from imatrix.quant.searches import qp_trial_scales

QK_K = 256
Q = gguf.GGMLQuantizationType
GROUP = 8  # values per grid point
MAX_LEVEL = 2  # grid levels are 0..2 (kMaxQ - 1)


# ----------------------------------------------------------------------------- grids

# iq2xs_init_impl's nwant: neighbours over this many of the nearest distances
N_DISTANCES = {Q.IQ2_XXS: 2, Q.IQ2_XS: 2, Q.IQ2_S: 1}


def lattice(qtype: Q) -> Lattice:
    """`qtype`'s grid and neighbour lists (`grids.lattice`, built once)."""
    return grids.lattice(qtype, N_DISTANCES[qtype])


def codes_of(levels: np.ndarray, axis: int = -1) -> np.ndarray:
    """Levels of groups of 8 (the values along `axis`) to their 2-bit codes."""
    return grids.codes_of(levels, 2, axis)


# ----------------------------------------------------------------------------- the scale search


def _qp_scale(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """The scale `make_qp_quants` returns for groups `x [n, g]` (every group's max >= GROUP_MAX_EPS).

    Its levels live in `uint8_t`: a negative level written there reads back modulo 256, while the
    level it has just computed enters the sums as the signed int it is.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        vmax = np.maximum(x.max(axis=0), F32(0))
        iscale = F32(nmax) / vmax
        stored = (nearest_exact(iscale * x).astype(np.int32) & 0xFF).astype(F32)
        diff = x - (F32(1) / iscale) * stored
        iscale = qp_trial_scales(x, w, nmax, vmax, iscale, sum_groups(w * diff * diff), nearest_exact)
        levels = np.minimum(nearest_exact(iscale * x), F32(nmax))
        wx = w * x
        sumlx = sum_groups(wx * levels)
        suml2 = sum_groups(w * levels * levels)
        sumlx, suml2 = _refine_wrapped(x, w, wx, (levels.astype(np.int32) & 0xFF).astype(F32), sumlx, suml2, nmax)
        return np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0)).astype(F32)


def _refine_wrapped(
    x: np.ndarray, w: np.ndarray, wx: np.ndarray, stored: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """`make_qp_quants`' 5 passes of moving one level at a time to its best value, `stored` the uint8 levels."""
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            li = stored[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = np.minimum(nearest_exact(x[i] * sl2 / slx), F32(nmax))
            new_lx = slx + wx[i] * new
            new_l2 = sl2 + w[i] * new * new
            take = (slx > 0) & (sl2 > 0) & (new != li) & (new_lx * new_lx * suml2 > sumlx * sumlx * new_l2)
            if take.any():
                changed = True
                stored[i] = np.where(take, (new.astype(np.int32) & 0xFF).astype(F32), li)
                sumlx = np.where(take, new_lx, sumlx)
                suml2 = np.where(take, new_l2, suml2)
        if not changed:  # a pass without change leaves the state as it was: C's early exit
            break
    return sumlx, suml2


@dataclass(frozen=True)
class Search:
    """How one type searches the scale of a sub-block (the parts where the three C kernels differ)."""

    qtype: Q
    size: int  # values sharing one scale
    tries: tuple[int, ...]  # candidate inverse scales (5 + 0.1 * t) / anchor
    eps: float  # a sub-block whose largest |x| is below this is stored as zeros
    even_signs: bool  # 7 stored sign bits per group (IQ2_XXS, IQ2_XS)
    qp_anchor: bool  # IQ2_XXS: candidates around make_qp_quants' scale, then every group refit


def _signs(x: np.ndarray, w: np.ndarray, even: bool) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes `xval [size, n]` and sign bits `[groups, n]`. With `even`, a group with an odd number of
    negative values flips the sign of the one with the least `w * x * x` (the first such): its sign bit
    toggles and its magnitude turns negative."""
    negative = x < 0
    xval = np.where(negative, -x, x)
    shape = (x.shape[0] // GROUP, GROUP, x.shape[1])
    bits = (1 << np.arange(GROUP, dtype=np.int32))[None, :, None]
    signs = (negative.reshape(shape) * bits).sum(axis=1, dtype=np.int32)
    if even:
        odd = negative.reshape(shape).sum(axis=1) % 2 == 1
        least = np.argmin((w * x * x).reshape(shape), axis=1)
        group, column = np.nonzero(odd)
        flipped = xval.reshape(shape)  # a view: flips in place
        row = least[group, column]
        flipped[group, row, column] = -flipped[group, row, column]
        signs = (signs ^ np.where(odd, 1 << least, 0)) & 0x7F
    return xval, signs


def _snap(
    lat: Lattice, xval: np.ndarray, waux: np.ndarray, inv_scale: np.ndarray, scale: np.ndarray,
    only: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Levels `[groups, n, T, 8]` (a group's values in a row) of every group at inverse scales
    `inv_scale [n, T]`, a group off the grid moved to its best neighbour at `scale [n, T]` (with
    `only [groups, n]`, and T = 1: only those groups). Returns the levels and which groups were moved."""
    n_groups = xval.shape[0] // GROUP
    by_value = [np.moveaxis(a.reshape(n_groups, GROUP, -1), 1, 0) for a in (xval, waux)]  # [8, groups, n]
    rows = np.ascontiguousarray(by_value[0].transpose(1, 2, 0))[:, :, None, :]  # [groups, n, 1, 8]
    levels = np.clip(nearest(F32(0.5) * (inv_scale[:, :, None] * rows - F32(1))), F32(0), F32(MAX_LEVEL))
    codes = codes_of(levels)
    if only is None:
        _, off = best_on_grid(lat, codes, *by_value, scale[None], levels=levels)
    else:
        group, column = np.nonzero(only)
        found, moved = best_on_grid(lat, codes[group, column], *(a[:, group, column] for a in by_value), scale[column])
        off = np.zeros(codes.shape, dtype=bool)
        off[group, column] = moved
        put_levels(lat, levels, np.flatnonzero(off), found[moved])
    return levels, off


@dataclass
class _Fit:
    """The search state of the active sub-blocks: the chosen scale, levels, and which groups were on the grid."""

    scale: np.ndarray  # [n]
    levels: np.ndarray  # [size, n]
    on_grid: np.ndarray  # [groups, n]


def _try_scales(spec: Search, lat: Lattice, xval: np.ndarray, w: np.ndarray, waux: np.ndarray,
                anchor: np.ndarray, scale: np.ndarray) -> _Fit:
    """The candidates `(5 + 0.1 t) / anchor`: the first best fit by `sumqx^2 / sumq2` wins."""
    n = xval.shape[1]
    tries = np.array(spec.tries, dtype=F32)
    inv = (F32(2 * MAX_LEVEL + 1) + tries * F32(0.1))[None, :] / anchor[:, None]  # [n, T]
    trial, off = _snap(lat, xval, waux, inv, F32(1) / inv)
    sumqx, sumq2 = (np.ascontiguousarray(a.T) for a in odd_sums(xval, w, trial))  # [T, n]
    best_try = np.full(n, -1)
    best = np.zeros_like(scale)
    for t in range(tries.size):
        better = (sumq2[t] > 0) & (sumqx[t] * sumqx[t] > best * sumq2[t])
        scale = np.where(better, sumqx[t] / np.where(better, sumq2[t], F32(1)), scale)
        best = np.where(better, scale * sumqx[t], best)
        best_try[better] = t
    cols, chosen, t_best = np.arange(n), best_try >= 0, np.maximum(best_try, 0)
    levels = np.where(chosen, value_major(trial[:, cols, t_best]), F32(0))
    on_grid = np.where(chosen, ~off[:, cols, t_best], True)
    return _Fit(scale, levels, on_grid)


def _refit(spec: Search, lat: Lattice, xval: np.ndarray, w: np.ndarray, waux: np.ndarray, fit: _Fit) -> None:
    """Round again at the chosen scale, then refit it: every group (IQ2_XXS), or only those that were
    moved onto the grid (IQ2_XS, IQ2_S)."""
    positive = fit.scale > 0
    refit = np.broadcast_to(positive, fit.on_grid.shape) & (True if spec.qp_anchor else ~fit.on_grid)
    if not refit.any():
        return
    inv = np.where(positive, F32(1) / np.where(positive, fit.scale, F32(1)), F32(0))
    moved, _ = _snap(lat, xval, waux, inv[:, None], fit.scale[:, None], only=refit)
    fit.levels = np.where(np.repeat(refit, GROUP, axis=0), value_major(moved[:, :, 0]), fit.levels)
    rows = np.moveaxis(fit.levels.reshape(-1, GROUP, fit.levels.shape[1], 1), 1, -1)
    sumqx, sumq2 = (a[:, 0] for a in odd_sums(xval, w, rows))
    take = refit.any(axis=0) & (sumq2 > 0)
    fit.scale = np.where(take, sumqx / np.where(take, sumq2, F32(1)), fit.scale)


def search_scales(spec: Search, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale `[n]`, grid indices `[groups, n]` and sign bits `[groups, n]` of sub-blocks `x [size, n]`
    (the groups layout) with weights `w`. A zero sub-block gets zeros everywhere, as C writes nothing."""
    lat = lattice(spec.qtype)
    n_groups, n = spec.size // GROUP, x.shape[1]
    xval, signs = _signs(x, w, spec.even_signs)
    active = np.flatnonzero(xval.max(axis=0) >= F32(spec.eps))
    xval, w = xval[:, active], w[:, active]
    if spec.qp_anchor:
        scale = _qp_scale(xval, w, MAX_LEVEL + 2)
        anchor = scale * F32(MAX_LEVEL + 1)
        keep = np.flatnonzero(anchor > 0)
        active, xval, w, scale, anchor = active[keep], xval[:, keep], w[:, keep], scale[keep], anchor[keep]
    else:
        anchor = xval.max(axis=0)
        scale = anchor / F32(2 * MAX_LEVEL + 1)
    waux = np.sqrt(w)
    fit = _try_scales(spec, lat, xval, w, waux, anchor, scale)
    _refit(spec, lat, xval, w, waux, fit)
    grid = lat.index_of[codes_of(fit.levels.reshape(n_groups, GROUP, active.size).transpose(0, 2, 1))]
    if (grid < 0).any():
        raise AssertionError(f"{spec.qtype.name}: a group ended off the grid")
    # a negative scale (never seen) is stored positive with every sign flipped, as C does
    flip = np.where(fit.scale < 0, 0x7F if spec.even_signs else 0xFF, 0)
    out_scale = np.zeros(n, dtype=F32)
    out_grid = np.zeros((n_groups, n), dtype=np.int32)
    out_signs = np.zeros((n_groups, n), dtype=np.int32)
    out_scale[active] = np.abs(fit.scale)
    out_grid[:, active] = grid
    out_signs[:, active] = signs[:, active] ^ flip
    return out_scale, out_grid, out_signs


# ----------------------------------------------------------------------------- the types


def _scale_codes(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Super-block scale `max / 31` `[n]`, each sub-block scale `[n, k]` as a 4-bit code of it, and whether
    the super-block has any scale at all (C stores no codes, and for IQ2_XXS/XS no grid, otherwise)."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(max_scale > 0, F32(1) / d, F32(0))
        codes = np.clip(nearest_exact(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 15).astype(np.uint32)
    return d, codes, (max_scale > 0)[:, None]


class _IQ2(QuantType):
    search: Search
    weight_factor: float  # sigma2 = factor * mean(x^2) of the super-block

    @classmethod
    def value_weights(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        """`qw * sqrt(sigma2 + x^2)` (the `_impl` kernels); without an imatrix, IQ2_S's `sigma2/4 + x^2`."""
        sigma2 = block_sigma2(blocks, cls.weight_factor)[:, None]
        if weights is None:
            if cls.search.even_signs:  # ggml_quantize_chunk asserts: these types need an imatrix
                raise ImatrixError(f"{cls.qtype.name} cannot be made without an importance matrix "
                                   "(llama.cpp's ggml_quantize_chunk asserts that these types get one)")
            return F32(0.25) * sigma2 + blocks * blocks
        return weights * np.sqrt(sigma2 + blocks * blocks)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        x = np.asarray(blocks, dtype=F32)
        qw = None if weights is None else np.asarray(weights, dtype=F32)
        size = cls.search.size
        # a trial holds a few copies of its sub-blocks; the neighbour search, ~10-100 values per value
        parts = []
        for part in steps(x.shape[0], QK_K, copies=4):
            w = cls.value_weights(x[part], None if qw is None else qw[part])
            scale, grid, signs = search_scales(cls.search, to_groups(x[part], size), to_groups(w, size))
            n = x[part].shape[0]
            parts.append(cls.pack(from_groups(scale, n), grid.T.reshape(n, -1), signs.T.reshape(n, -1)))
        return np.concatenate(parts, axis=0)

    @classmethod
    def pack(cls, scales: np.ndarray, grid: np.ndarray, signs: np.ndarray) -> np.ndarray:
        """Per super-block: sub-block scales `[n, k]`, grid indices and sign bits `[n, groups]` to bytes."""
        raise NotImplementedError


class IQ2_XXS(_IQ2, qtype=Q.IQ2_XXS):
    search = Search(Q.IQ2_XXS, 32, tuple(range(-6, 7)), float(GROUP_MAX_EPS), even_signs=True, qp_anchor=True)
    weight_factor = 1.0

    @classmethod
    def pack(cls, scales: np.ndarray, grid: np.ndarray, signs: np.ndarray) -> np.ndarray:
        d, codes, nonzero = _scale_codes(scales)
        n = scales.shape[0]
        grid = grid.astype(np.uint32).reshape(n, 8, 4)
        signs = signs.astype(np.uint32).reshape(n, 8, 4)
        low = (grid << (8 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
        high = (signs << (7 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32) | (codes << 28)
        qs = np.stack([low, high], axis=2).reshape(n, 16)
        qs = np.where(nonzero, qs, np.uint32(0))  # all-zero super-block: C leaves qs zero
        return np.concatenate([fp16_bytes(d), qs.astype("<u4").view(np.uint8).reshape(n, -1)], axis=1)


def _pack_nibble_scales(codes: np.ndarray) -> np.ndarray:
    """Sixteen 4-bit codes `[n, 16]` to `scales[8]`: sub-block 2j in the low nibble, 2j+1 in the high one."""
    codes = codes.astype(np.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


class IQ2_XS(_IQ2, qtype=Q.IQ2_XS):
    search = Search(Q.IQ2_XS, 16, tuple(range(-9, 10)), float(GROUP_MAX_EPS), even_signs=True, qp_anchor=False)
    weight_factor = 1.0

    @classmethod
    def pack(cls, scales: np.ndarray, grid: np.ndarray, signs: np.ndarray) -> np.ndarray:
        d, codes, nonzero = _scale_codes(scales)
        qs = np.where(nonzero, grid.astype(np.uint16) | (signs.astype(np.uint16) << 9), np.uint16(0))
        packed_scales = np.where(nonzero, _pack_nibble_scales(codes), np.uint8(0))
        return np.concatenate([fp16_bytes(d), qs.astype("<u2").view(np.uint8), packed_scales], axis=1)


class IQ2_S(_IQ2, qtype=Q.IQ2_S):
    search = Search(Q.IQ2_S, 16, tuple(range(-9, 10)), 1e-8, even_signs=False, qp_anchor=False)
    weight_factor = 2.0

    @classmethod
    def pack(cls, scales: np.ndarray, grid: np.ndarray, signs: np.ndarray) -> np.ndarray:
        d, codes, nonzero = _scale_codes(scales)
        n = scales.shape[0]
        high = (grid >> 8).astype(np.uint8).reshape(n, 8, 4) << (2 * np.arange(4, dtype=np.uint8))
        qh = np.bitwise_or.reduce(high, axis=2)
        packed_scales = np.where(nonzero, _pack_nibble_scales(codes), np.uint8(0))
        # C stores d * 0.9875 but derives the codes from d itself
        parts = [fp16_bytes(d * F32(0.9875)), (grid & 0xFF).astype(np.uint8), signs.astype(np.uint8), qh, packed_scales]
        return np.concatenate(parts, axis=1)
