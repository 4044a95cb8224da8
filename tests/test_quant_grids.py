"""The run search of quant/grids.py (`best_on_grid`) against the trial-by-trial search it stands for
(`best_neighbours`, C's order): the same grid point for every group at every trial, including the cases
the run search leaves to it (near and exact ties, zero weights, scales that rise or are not numbers)."""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imatrix.quant.grids import best_neighbours, best_on_grid, lattice

Q = gguf.GGMLQuantizationType
LATTICES = [(Q.IQ3_XXS, 2), (Q.IQ3_S, 3), (Q.IQ2_XXS, 2), (Q.IQ2_XS, 2), (Q.IQ2_S, 1), (Q.IQ1_S, 3)]


def trial_by_trial(lat, codes, xval, waux, scale, values=None):  # noqa: ANN001, ANN201
    """`best_on_grid`'s answer, one `best_neighbours` call per entry off the grid."""
    index = lat.index_of[codes].copy()
    n_trials = codes.shape[-1]
    for flat in np.flatnonzero(index < 0):
        g = flat // n_trials
        v = None if values is None else values if values.ndim == 1 else values.reshape(values.shape[0], -1)[:, [g]]
        s = np.broadcast_to(scale, codes.shape).reshape(-1)[[flat]]
        x, w = (a.reshape(a.shape[0], -1)[:, [g]] for a in (xval, waux))
        index.reshape(-1)[flat] = best_neighbours(lat, codes.reshape(-1)[[flat]], x, w, s, v)[0]
    return index


def rounded_groups(rng: np.random.Generator, lat, n_groups: int, n_trials: int, kind: str):  # noqa: ANN001, ANN201
    """Values, weights and falling trial scales of groups, and their codes as the kernels round them."""
    dim, top = lat.levels.shape[1], 2 * lat.n_levels - 1
    x = np.abs(rng.standard_normal((dim, n_groups))).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2) / 2 + np.float32(0.5)
    w = rng.random((dim, n_groups)).astype(np.float32)
    if kind == "zero weights":
        w[rng.random(w.shape) < 0.4] = 0
        w[:, ::7] = 0
    if kind == "equal weights":
        w[:] = 1
    vmax = x.max(axis=0)
    inv = (np.float32(top) + np.linspace(-3, 3, n_trials, dtype=np.float32))[None, :] / vmax[:, None]
    if kind == "rising":
        inv = inv[:, ::-1].copy()
    levels = np.clip(np.rint(np.float32(0.5) * (inv[None] * x[:, :, None] - np.float32(1))), 0, lat.n_levels - 1)
    codes = (levels.astype(np.int32) << (lat.bits * np.arange(dim))[:, None, None]).sum(axis=0, dtype=np.int32)
    return codes, x, np.sqrt(w), (np.float32(1) / inv).astype(np.float32)


@pytest.mark.parametrize(("qtype", "n_distances"), LATTICES)
@pytest.mark.parametrize("kind", ["plain", "ties", "zero weights", "equal weights", "rising"])
def test_runs_match_trial_by_trial(qtype: Q, n_distances: int, kind: str) -> None:
    lat = lattice(qtype, n_distances)
    rng = np.random.default_rng(zlib.crc32(f"{qtype.name} {kind}".encode()))
    codes, x, waux, scale = rounded_groups(rng, lat, 300, 13, kind)
    index, off = best_on_grid(lat, codes, x, waux, scale)
    assert off.any()
    np.testing.assert_array_equal(index, trial_by_trial(lat, codes, x, waux, scale))
    assert (index >= 0).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-40, 30), zero=st.floats(0, 1))
def test_scales_of_any_size(seed: int, log_scale: float, zero: float) -> None:
    """Tiny and huge values and weights (a run whose numbers overflow is searched trial by trial)."""
    lat = lattice(Q.IQ3_S, 3)
    rng = np.random.default_rng(seed)
    codes, x, waux, scale = rounded_groups(rng, lat, 60, 7, "plain")
    factor = np.float32(10.0**log_scale)
    waux = np.where(rng.random(waux.shape) < zero, np.float32(0), waux * factor)
    with np.errstate(all="ignore"):
        x, scale = x * factor, scale * factor
        index, _ = best_on_grid(lat, codes, x, waux, scale)
        np.testing.assert_array_equal(index, trial_by_trial(lat, codes, x, waux, scale))


def test_level_values_per_group() -> None:
    """IQ1's shifted levels (`values [3, groups]`), one trial per group."""
    lat = lattice(Q.IQ1_S, 3)
    rng = np.random.default_rng(7)
    n = 400
    codes = rng.integers(0, 3, (8, n))
    codes = (codes << (2 * np.arange(8))[:, None]).sum(axis=0).astype(np.int32)[:, None]
    x = rng.standard_normal((8, n)).astype(np.float32)
    w = np.where(rng.random((8, n)) < 0.2, 0, rng.random((8, n))).astype(np.float32)
    shift = np.where(rng.random(n) < 0.5, 0.125, -0.125).astype(np.float32)
    values = np.array([-1, 0, 1], dtype=np.float32)[:, None] + shift
    scale = rng.random((n, 1)).astype(np.float32)
    index, off = best_on_grid(lat, codes, x, w, scale, values)
    assert off.any()
    np.testing.assert_array_equal(index, trial_by_trial(lat, codes, x, w, scale, values))
