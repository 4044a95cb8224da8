"""3-bit lattice types IQ3_XXS and IQ3_S (256-value super-blocks of eight 32-value sub-blocks),
bit-compatible with llama.cpp's `quantize_row_iq3_xxs_impl` and `quantize_row_iq3_s_impl`.

Each group of 4 magnitudes is one point of a grid of 4-vectors with levels 0..7 (value `(2l+1) * scale`):
256 points for IQ3_XXS, 512 for IQ3_S (`grids.py`); signs are stored apart. Each sub-block tries a few
dozen scales; at each, a group whose rounded levels are off the grid takes its best neighbour on the grid
(all scales at once: `grids.best_on_grid`), and the scale with the best weighted fit wins. The groups still
off the grid are then re-rounded at that scale and the scale refitted. The sub-block scales become 4-bit
multiples of one fp16 super-block scale.

The two kernels differ in small ways, kept as data in `Variant`: IQ3_XXS stores 7 sign bits per 8 values
(an odd number of negatives flips the value that matters least, which then enters the search as a
negative value) and re-rounds only the groups off the grid; IQ3_S re-rounds every group.

llama.cpp quirk kept: `quantize_row_iq3_s_impl` skips an all-zero sub-block without advancing its
`qs` and `signs` pointers, so the following sub-blocks' grid indices and signs move up one slot (their
high bits in `qh` stay in place) and the last slots stay zero.

Nothing here is implementation-defined in C (the neighbour lists are totally ordered, every search keeps
the first best candidate). llama-quantize requires an imatrix for IQ3_XXS (but token_embd / output);
the kernels themselves have their own weights without one, as here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np

from imatrix.quant.base import QuantType
from imatrix.quant.blocks import F32, fp16_bytes, nearest, nearest_exact, steps
from imatrix.quant.grids import Lattice, best_on_grid, lattice, odd_sums, value_major
from imatrix.quant.kquants import imatrix_weights

Q = gguf.GGMLQuantizationType
QK_K = 256
SUB = 32  # values per sub-block (one scale)
GROUP = 4  # values per grid point
MAX_LEVEL = 7  # kMaxQ - 1
# Super-blocks per step: `blocks.steps` with this many copies (the trial levels of a super-block hold a few
# dozen values per input value; larger steps measured no faster, ~15 MiB per step)
STEP_COPIES = 16


@dataclass(frozen=True)
class Variant:
    """What distinguishes the IQ3_XXS kernel from the IQ3_S one (see the module docstring)."""

    grid: Q
    n_distances: int  # iq3xs_init_impl's nwant
    n_steps: int  # candidate scales (15 + 0.2 * step) / max for step in [-n_steps, n_steps]
    zero_below: float  # a sub-block whose largest magnitude is below this is all zero (0: exactly zero)
    even_signs: bool  # 7 sign bits per 8 values
    refit_all: bool  # the final re-rounding covers groups already on the grid too
    unset_off_grid: bool  # how the groups count while no candidate scale has been taken
    fudge: float  # the stored super-block scale is max_scale / 31 times this


XXS = Variant(Q.IQ3_XXS, 2, 15, 1e-8, even_signs=True, refit_all=False, unset_off_grid=False, fudge=1.0125)
S = Variant(Q.IQ3_S, 3, 9, 0.0, even_signs=False, refit_all=True, unset_off_grid=True, fudge=1.033)


@dataclass
class SubBlocks:
    """The per-sub-block result: levels `[32, n]`, sign bits `[4, n]` (one byte per 8 values), scale `[n]`,
    and which sub-blocks were skipped as all zero."""

    levels: np.ndarray
    signs: np.ndarray
    scale: np.ndarray
    skipped: np.ndarray


def weights_of(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Per-value weights of super-blocks `x [n, 256]`: `qw*sqrt(sigma2 + x^2)` with an imatrix, else `x^2`."""
    return x * x if qw is None else imatrix_weights(x, qw, 2.0)


def quantize_sub_blocks(v: Variant, x: np.ndarray, w: np.ndarray) -> SubBlocks:
    """The scale search of every sub-block; `x`, `w` in the groups layout `[32, n]`."""
    lat = lattice(v.grid, v.n_distances)
    waux = np.sqrt(w)
    negative = x < 0
    xval = np.abs(x)
    if v.even_signs:
        _even_signs(x, w, xval, negative)
    bits = (negative.reshape(SUB // 8, 8, -1) << np.arange(8)[None, :, None]).sum(axis=1)
    signs = bits & 0x7F if v.even_signs else bits
    vmax = xval.max(axis=0)
    skipped = vmax < F32(v.zero_below) if v.zero_below else vmax == 0
    levels, scale = np.zeros(x.shape, dtype=F32), np.zeros(x.shape[1], dtype=F32)
    live = np.flatnonzero(~skipped)
    if live.size:
        lv, sc = _search(v, lat, xval[:, live], w[:, live], waux[:, live], vmax[live])
        levels[:, live], scale[live] = lv, sc
    # a negative fit (IQ3_XXS's negated values outweighing the rest): C makes it positive, flipping the signs
    flip = scale < 0
    scale = np.abs(scale)
    signs = np.where(flip, ~signs & (0x7F if v.even_signs else 0xFF), signs)
    return SubBlocks(levels, signs.astype(np.uint8), scale, skipped)


def _even_signs(x: np.ndarray, w: np.ndarray, xval: np.ndarray, negative: np.ndarray) -> None:
    """IQ3_XXS: in each 8 values with an odd number of negatives, the value of least `w*x*x` (the first
    such) changes sign: its magnitude enters the search negated. Updates `xval` and `negative` in place."""
    odd = negative.reshape(SUB // 8, 8, -1).sum(axis=1) % 2 == 1  # [4, n]
    group, col = np.nonzero(odd)
    cost = (w * x * x).reshape(SUB // 8, 8, -1)[group, :, col]  # [m, 8]
    row = group * 8 + np.argmin(cost, axis=1)
    xval[row, col] = -xval[row, col]
    negative[row, col] = ~negative[row, col]


def _search(
    v: Variant, lat: Lattice, xval: np.ndarray, w: np.ndarray, waux: np.ndarray, vmax: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Levels `[32, n]` and scale `[n]` of sub-blocks with a non-zero maximum."""
    n = xval.shape[1]
    tries = np.arange(-v.n_steps, v.n_steps + 1, dtype=F32)
    inv = (F32(2 * MAX_LEVEL + 1) + tries * F32(0.2))[None, :] / vmax[:, None]  # [n, n_try]
    trial_levels, off_grid = _grid_levels(lat, xval, waux, inv, F32(1) / inv)
    sumqx, sumq2 = (np.ascontiguousarray(a.T) for a in odd_sums(xval, w, trial_levels))  # [n_try, n]

    # C's loop over the candidates in order: a later one must beat the best so far strictly
    best_try = np.full(n, -1)
    scale, best = vmax / F32(2 * MAX_LEVEL + 1), np.zeros(n, dtype=F32)
    for t in range(inv.shape[1]):
        better = (sumq2[t] > 0) & (sumqx[t] * sumqx[t] > best * sumq2[t])
        scale = np.where(better, sumqx[t] / np.where(better, sumq2[t], F32(1)), scale)
        best = np.where(better, scale * sumqx[t], best)
        best_try[better] = t
    cols, chosen, t_best = np.arange(n), best_try >= 0, np.maximum(best_try, 0)
    levels = np.where(chosen, value_major(trial_levels[:, cols, t_best]), F32(0))
    off = np.where(chosen, off_grid[:, cols, t_best], v.unset_off_grid)
    return _refit(v, lat, xval, w, waux, levels, off, scale)


def _grid_levels(
    lat: Lattice, xval: np.ndarray, waux: np.ndarray, inv: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Round `xval [32, n]` at inverse scales `inv [n, T]` and move each group of 4 off the grid to its
    best neighbour at `scale [n, T]`. Returns the levels `[8 groups, n, T, 4]` (a group's values in a row)
    and which groups were off `[8, n, T]`."""
    by_group = np.moveaxis(xval.reshape(SUB // GROUP, GROUP, -1), 1, 0)  # [4, 8, n]
    rows = np.ascontiguousarray(by_group.transpose(1, 2, 0))[:, :, None, :]  # [8, n, 1, 4]
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = F32(0.5) * (inv[:, :, None] * rows - F32(1))
        # nearest_int is rint below 2**22; past that (tiny scales: inf, nan) C's bits give garbage, kept
        reach = np.abs(xval).max(axis=0, initial=0) * np.abs(inv).max(axis=1, initial=0)
        small = bool(np.isfinite(inv).all() and (reach < F32(2**21)).all())
        levels = np.clip(nearest(scaled) if small else nearest_exact(scaled), F32(0), F32(MAX_LEVEL))
    _, off = best_on_grid(lat, lat.codes_of(levels), by_group, np.moveaxis(waux.reshape(SUB // GROUP, GROUP, -1), 1, 0),
                          scale[None], levels=levels)
    return levels, off


def _refit(
    v: Variant, lat: Lattice, xval: np.ndarray, w: np.ndarray, waux: np.ndarray,
    levels: np.ndarray, off: np.ndarray, scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-round at the chosen scale (groups off the grid, or all for IQ3_S) and refit the scale."""
    cols = np.flatnonzero(off.any(axis=0) & (scale > 0))
    if cols.size == 0:
        return levels, scale
    sc = scale[cols][:, None]
    again = _grid_levels(lat, xval[:, cols], waux[:, cols], F32(1) / sc, sc)[0]  # [8, m, 1, 4]
    sumqx, sumq2 = (a[:, 0] for a in odd_sums(xval[:, cols], w[:, cols], again))
    again = value_major(again[:, :, 0])
    if not v.refit_all:
        keep = np.repeat(~off[:, cols], GROUP, axis=0)
        again = np.where(keep, levels[:, cols], again)
        sumqx, sumq2 = (a[:, 0] for a in odd_sums(xval[:, cols], w[:, cols],
                                                    np.moveaxis(again.reshape(SUB // GROUP, GROUP, -1, 1), 1, -1)))
    levels[:, cols] = again
    scale[cols] = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), sc[:, 0])
    return levels, scale


def super_block_scale(scale: np.ndarray, fudge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-block scales `[n, 8]` to the fp16 bytes of `max/31 * fudge`, their 4-bit codes `[n, 8]`, and
    which super-blocks have a non-zero scale (the others store d = 0 and codes 0)."""
    max_scale = scale.max(axis=1)
    live = max_scale > 0
    d = max_scale / F32(31)
    inv = F32(1) / np.where(live, d, F32(1))
    codes = np.clip(nearest(F32(0.5) * (inv[:, None] * scale - F32(1))), 0, 15).astype(np.uint8)
    return fp16_bytes(np.where(live, d * F32(fudge), F32(0))), np.where(live[:, None], codes, 0), live


def _quantize(v: Variant, blocks: np.ndarray, weights: np.ndarray | None) -> tuple[SubBlocks, np.ndarray]:
    """Every sub-block of super-blocks `[n, 256]`, and their grid indices `[n, 8 sub-blocks, 8 groups]`."""
    x = np.asarray(blocks, dtype=F32)
    w = weights_of(x, None if weights is None else np.asarray(weights, dtype=F32))
    sub = quantize_sub_blocks(v, np.ascontiguousarray(x.reshape(-1, SUB).T), np.ascontiguousarray(w.reshape(-1, SUB).T))
    lat = lattice(v.grid, v.n_distances)
    grouped = sub.levels.reshape(SUB // GROUP, GROUP, -1)  # [8 groups, 4, sub-blocks]
    index = lat.index_of[lat.codes_of(np.moveaxis(grouped, 1, -1))].T  # [sub-blocks, 8 groups]
    return sub, index.reshape(x.shape[0], QK_K // SUB, SUB // GROUP)


class _LatticeIQ3(QuantType):
    """The shared driver: search every sub-block, then pack (each type's `_pack`)."""

    variant: ClassVar[Variant]

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        parts = steps(blocks.shape[0], QK_K, copies=STEP_COPIES)
        return np.concatenate([cls._pack(*_quantize(cls.variant, blocks[p], None if weights is None else weights[p]))
                               for p in parts], axis=0)

    @staticmethod
    def _pack(sub: SubBlocks, index: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class IQ3_XXS(_LatticeIQ3, qtype=Q.IQ3_XXS):
    variant = XXS

    @staticmethod
    def _pack(sub: SubBlocks, index: np.ndarray) -> np.ndarray:
        """d, the grid indices, then per sub-block 4 x 7 sign bits and the 4-bit scale (a uint32)."""
        n = index.shape[0]
        d, codes, live = super_block_scale(sub.scale.reshape(n, -1), XXS.fudge)
        signs = np.where(sub.skipped, 0, sub.signs).T.reshape(n, -1, SUB // 8).astype(np.uint32)
        packed = (signs << (7 * np.arange(SUB // 8, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
        packed |= codes.astype(np.uint32) << 28
        index = np.where(sub.skipped.reshape(n, -1, 1), 0, index)
        quants = np.concatenate([index.reshape(n, -1).astype(np.uint8), packed.astype("<u4").view(np.uint8)], axis=1)
        return np.concatenate([d, np.where(live[:, None], quants, 0)], axis=1)


class IQ3_S(_LatticeIQ3, qtype=Q.IQ3_S):
    variant = S

    @staticmethod
    def _pack(sub: SubBlocks, index: np.ndarray) -> np.ndarray:
        """d, the grid indices' low bytes, their 9th bits, the sign bytes, the 4-bit scales in pairs."""
        n, n_sub = index.shape[:2]
        skipped = sub.skipped.reshape(n, n_sub)
        d, codes, _ = super_block_scale(sub.scale.reshape(n, n_sub), S.fudge)
        high = ((index >> 8).astype(np.uint8) << np.arange(SUB // GROUP, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
        high = np.where(skipped, 0, high)
        # quantize_row_iq3_s_impl quirk: a skipped sub-block does not advance qs / signs (module docstring)
        slot = np.cumsum(~skipped, axis=1) - 1
        rows, subs = np.nonzero(~skipped)
        qs = np.zeros((n, n_sub, SUB // GROUP), dtype=np.uint8)
        qs[rows, slot[rows, subs]] = (index[rows, subs] & 0xFF).astype(np.uint8)
        signs = np.zeros((n, n_sub, SUB // 8), dtype=np.uint8)
        signs[rows, slot[rows, subs]] = sub.signs.T.reshape(n, n_sub, -1)[rows, subs]
        scales = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return np.concatenate([d, qs.reshape(n, -1), high, signs.reshape(n, -1), scales], axis=1)
