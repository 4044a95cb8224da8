"""The scale searches of ggml-quants.c (`make_qx_quants`, `make_q3_quants`, `make_qp_quants`,
`make_qkx2_quants` / `make_qkx3_quants`), shared by the legacy types and the K-quants.

Layout: every function takes the **groups** layout of `blocks.py`, `x [n_values, n_groups]`, one
column per group (a sub-block, or the sub-block scales of one super-block), and sums in C's order
(`sum_groups`). The bit-exactness rules are those of `blocks.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from imatrix.quant.blocks import (
    F32,
    GROUP_MAX_EPS,
    divide_where,
    nearest,
    signed_absmax_groups,
    sum_groups,
    sum_groups_from_first,
)


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search, llama.cpp `make_qx_quants` with rmse_type 1 (weights `w`, or x*x there).

    Returns `(scale [g], levels [n, g])`, levels in `[0, 2*nmax)`; an all-zero group gives 0 and 0.
    """
    amax, vmax = signed_absmax_groups(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)

    wx = w * x  # C computes w*x*l as (w*x)*l: the product can be shared by every candidate
    lo, hi = F32(-nmax), F32(nmax - 1)
    # 20 candidates over the same shapes: reused buffers instead of fresh temporaries each time
    levels, product = np.empty_like(x), np.empty_like(x)

    def levels_for(iscale: np.ndarray) -> np.ndarray:
        np.multiply(iscale, x, out=levels)
        np.rint(levels, out=levels)  # nearest_int
        return np.clip(levels, lo, hi, out=levels)

    def try_scale(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels_for(iscale)
        sumlx = sum_groups(np.multiply(wx, levels, out=product))
        np.multiply(w, levels, out=product)
        return sumlx, sum_groups(np.multiply(product, levels, out=product))

    best_iscale = F32(-nmax) / vmax
    sumlx, suml2 = try_scale(best_iscale)
    scale = divide_where(sumlx, suml2, suml2 != 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / vmax
        lx, l2 = try_scale(iscale)
        better = (l2 > 0) & (lx * lx > best * l2)
        np.copyto(best_iscale, iscale, where=better)
        np.divide(lx, l2, out=scale, where=better)
        np.multiply(scale, lx, out=best, where=better)
    # the levels of the winning candidate, recomputed once rather than kept for every candidate
    levels = np.where(zero, F32(0), levels_for(best_iscale) + F32(nmax))
    return np.where(zero, F32(0), scale).astype(F32), levels


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp `make_q3_quants` with do_rmse: x*x-weighted fit, then coordinate-wise level refinement.

    Returns `(scale [g], levels [n, g])`, levels in `[0, 2*nmax)`.
    """
    amax, vmax = signed_absmax_groups(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    levels = np.clip(nearest(F32(-nmax) / vmax * x), -nmax, nmax - 1)
    w = x * x
    sumlx = sum_groups(w * x * levels)
    suml2 = sum_groups(w * levels * levels)
    sumlx, suml2 = _refine(x, w, levels, sumlx, suml2, (-nmax, nmax - 1), qp_rules=False)
    scale = divide_where(sumlx, suml2, suml2 > 0)
    levels = np.where(zero, F32(0), levels + F32(nmax))
    return np.where(zero, F32(0), scale).astype(F32), levels


def _refine(
    x: np.ndarray,
    w: np.ndarray,
    levels: np.ndarray,
    sumlx: np.ndarray,
    suml2: np.ndarray,
    bounds: tuple[float, float],
    qp_rules: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The 5-pass coordinate descent of `make_q3_quants` / `make_qp_quants`; updates `levels` in place.

    Each value in turn moves to the level that is optimal for the other values' fit, kept if the
    fit improves. Running all passes equals C's early exit: a pass that changes nothing leaves the
    state as it was. The two C functions differ in small guards: `make_qp_quants` also needs the
    remaining `sl2 > 0` beforehand, `make_q3_quants` needs the new `sl2 > 0` afterwards.
    """
    lo, hi = bounds
    active = np.arange(x.shape[1])  # groups still changing: C leaves a group after a pass without change
    x_act, w_act, levels_act = x, w, levels
    sumlx_act, suml2_act = sumlx.copy(), suml2.copy()
    wx_act = w * x  # C's w*x*l is (w*x)*l
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(active.size, dtype=bool)
            for i in range(x.shape[0]):
                wi, xi, li, wxi = w_act[i], x_act[i], levels_act[i], wx_act[i]
                slx = sumlx_act - wxi * li
                sl2 = suml2_act - wi * li * li
                ok = (slx > 0) & (sl2 > 0) if qp_rules else slx > 0
                new = np.clip(nearest(xi * sl2 / slx), lo, hi)
                # most values keep their level: finish the test only where it would move
                moving = np.flatnonzero(ok & (new != li))
                if moving.size == 0:
                    continue
                new, slx, sl2 = new[moving], slx[moving], sl2[moving]
                new_lx = slx + wxi[moving] * new
                new_l2 = sl2 + wi[moving] * new * new
                old_lx = sumlx_act[moving]
                better = new_lx * new_lx * suml2_act[moving] > old_lx * old_lx * new_l2
                if not qp_rules:
                    better &= new_l2 > 0
                kept = moving[better]
                li[kept] = new[better]
                sumlx_act[kept] = new_lx[better]
                suml2_act[kept] = new_l2[better]
                changed[kept] = True
            if levels_act is not levels:
                levels[:, active] = levels_act
            sumlx = _scatter(sumlx, active, sumlx_act)
            suml2 = _scatter(suml2, active, suml2_act)
            still = np.flatnonzero(changed)
            if still.size == 0:
                break
            if still.size < active.size:
                active = active[still]
                x_act, w_act, levels_act = x_act[:, still], w_act[:, still], levels_act[:, still]
                wx_act = wx_act[:, still]
                sumlx_act, suml2_act = sumlx_act[still], suml2_act[still]
    return sumlx, suml2


def _scatter(full: np.ndarray, index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`full` with `values` at `index` (just `values` while every group is still active)."""
    if values.shape == full.shape:
        return values
    full = full.copy()
    full[index] = values
    return full


def qp_trial_scales(x: np.ndarray, w: np.ndarray, nmax: int, vmax: np.ndarray, iscale: np.ndarray,
                    best: np.ndarray, rounding: Callable[[np.ndarray], np.ndarray] = nearest) -> np.ndarray:
    """`make_qp_quants`' eight trial inverse scales `(nmax + 0.1 k) / vmax`, k = ±1…±4, per group of `x [n, g]`:
    each replaces `iscale` where its weighted error, levels clipped to `nmax`, is below the best so far."""
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (F32(0.1) * F32(step) + F32(nmax)) / vmax
        levels = np.minimum(rounding(trial * x), F32(nmax))
        diff = x - (F32(1) / trial) * levels
        mse = sum_groups(w * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, trial, iscale)
    return iscale


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp `make_qp_quants`: non-negative levels `[0, nmax]` for non-negative `x` (the sub-block
    scales or mins of a super-block), best of 9 trial scales, then refined. Returns `(scale, levels)`.
    """
    vmax = np.maximum(x.max(axis=0), F32(0))
    zero = vmax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    iscale = F32(nmax) / vmax
    scale = F32(1) / iscale
    levels = nearest(iscale * x)  # the first trial is not clipped to nmax
    diff = x - scale * levels
    iscale = qp_trial_scales(x, w, nmax, vmax, iscale, sum_groups(w * diff * diff))
    levels = np.minimum(nearest(iscale * x), F32(nmax))
    sumlx = sum_groups(w * x * levels)
    suml2 = sum_groups(w * levels * levels)
    sumlx, suml2 = _refine(x, w, levels, sumlx, suml2, (-np.inf, nmax), qp_rules=True)
    scale = divide_where(sumlx, suml2, suml2 > 0)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero, F32(0), levels)


def make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
    skip_unchanged: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine scale+min search, llama.cpp `make_qkx2_quants` (and `make_qkx3_quants`, the same
    search with explicit weights): levels `[0, nmax]`, value = scale * level - the_min.

    Tries iscale = (nmax + rmin + rdelta * k) / (max - min) for k = 0..nstep, each followed by a
    weighted least-squares fit of scale and min (min kept <= 0). Returns `(scale, the_min, levels)`.

    A group whose rounded levels are those of its previous trial would compute that trial's fit and error
    again, which cannot beat the best: from the second trial on only the groups whose levels changed are
    fitted (a fifth of them per trial for Q2_K's 37), the same operations on fewer columns. While a group's
    min stays, its levels only grow from trial to trial (the trial scale grows), so their sum tells.
    `skip_unchanged=False` fits every group at every trial, as C does (the tests compare the two).
    """
    vmin = np.min(x, axis=0)
    vmax = np.max(x, axis=0)
    vmin = np.where(vmin > 0, F32(0), vmin).astype(F32)
    flat = vmax == vmin
    flat_min = vmin
    vmin = np.where(flat, vmax - F32(1), vmin).astype(F32)  # any min < max: flat groups skip the search
    fit = _QkxFit(x, w, flat, use_mad, F32(nmax) / (vmax - vmin), vmin, nmax)
    cand = np.empty_like(x)
    # what tells a group's trial levels from its previous ones: their sum where the trial scales are all of
    # one sign and grow (every caller's search), the levels themselves otherwise (they may move both ways)
    monotone = rdelta > 0 and nmax + rmin > 0
    previous = None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            # llama.cpp quirk: the trial range uses the min of the best fit so far, not the data min
            trial = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (vmax - fit.vmin)
            np.multiply(trial, fit.shifted, out=cand)  # C: iscale * (x - min)
            np.clip(np.rint(cand, out=cand), 0, nmax, out=cand)
            signature = sum_groups(cand) if monotone else cand.copy()
            if previous is None or not skip_unchanged:
                fit.try_levels(cand, None)
            else:
                moved = signature != previous if monotone else (signature != previous).any(axis=0)
                changed = np.flatnonzero(moved | fit.moved_min)
                fit.try_levels(cand, changed if changed.size <= x.shape[1] // 2 else None)
            previous = signature
    levels = np.where(flat, F32(0), fit.levels)
    the_min = np.where(flat, -flat_min, -fit.vmin)
    return np.where(flat, F32(0), fit.scale).astype(F32), the_min.astype(F32), levels


class _QkxFit:
    """`make_qkx_quants`' best fit so far per group, and one trial's least-squares fit of some groups."""

    def __init__(self, x: np.ndarray, w: np.ndarray, flat: np.ndarray, use_mad: bool, iscale: np.ndarray,
                 vmin: np.ndarray, nmax: int) -> None:
        """The first fit: levels rounded at `iscale` from `vmin`, scale 1/`iscale`."""
        self.x, self.w, self.flat, self.use_mad = x, w, flat, use_mad
        self.sum_w, self.sum_x = sum_groups_from_first(w), sum_groups_from_first(w * x)
        self.scale, self.vmin = F32(1) / iscale, vmin
        self.shifted = x - vmin  # x - min of the best fit, per value
        self.levels = np.clip(nearest(iscale * self.shifted), 0, nmax)
        self.best = self.error(x, w, self.scale, vmin, self.levels)
        self.moved_min = np.zeros(x.shape[1], dtype=bool)  # groups whose min changed at the last trial

    def error(self, x: np.ndarray, w: np.ndarray, s: np.ndarray, m: np.ndarray, lev: np.ndarray) -> np.ndarray:
        diff = np.multiply(s, lev)
        np.add(diff, m, out=diff)
        np.subtract(diff, x, out=diff)  # scale * l + min - x, in C's order
        if self.use_mad:
            return sum_groups(np.multiply(w, np.abs(diff, out=diff), out=diff))
        np.multiply(diff, diff, out=diff)  # C squares first: w * (diff * diff)
        return sum_groups(np.multiply(w, diff, out=diff))

    def try_levels(self, cand: np.ndarray, groups: np.ndarray | None) -> None:
        """Fit `cand` (all groups' trial levels) in `groups` (None: every group), keeping the better fits."""
        if groups is None:
            x, w, lev, sum_w, sum_x, flat = self.x, self.w, cand, self.sum_w, self.sum_x, self.flat
        else:
            x, w, lev = (np.take(a, groups, axis=1) for a in (self.x, self.w, cand))
            sum_w, sum_x, flat = self.sum_w[groups], self.sum_x[groups], self.flat[groups]
        weighted = np.multiply(w, lev)  # C: w*l, then (w*l)*l and (w*l)*x
        sum_l = sum_groups(weighted)
        sum_l2 = sum_groups(np.multiply(weighted, lev))
        sum_xl = sum_groups(np.multiply(weighted, x, out=weighted))
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = (det > 0) & ~flat
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur = self.error(x, w, this_scale, this_min, lev)
        better = ok & (cur < (self.best if groups is None else self.best[groups]))
        won = np.flatnonzero(better) if groups is None else groups[better]
        self.moved_min[:] = False
        self.moved_min[won] = True
        self.levels[:, won] = lev[:, better] if groups is not None else cand[:, won]
        self.best[won] = cur[better]
        self.scale[won] = this_scale[better]
        self.vmin[won] = this_min[better]
        self.shifted[:, won] = self.x[:, won] - self.vmin[won]
