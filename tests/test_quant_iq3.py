"""IQ3_XXS and IQ3_S against llama-quantize's own bytes (blocks, and whole files of the IQ3 file types
with their mixes), the IQ3 grids' neighbour lists, llama.cpp's IQ3_S slot quirk, and reconstruction sanity."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imatrix.quant.base import quantize_rows
from imatrix.quant.grids import best_neighbours, lattice
from quant_golden import gaussian_relative_rms, random_imatrix, random_rows, round_trip_blocks
from quant_iq1_iq3.compare import compare_blocks, file_matches
from quant_iq1_iq3.generate import BLOCK_GOLDENS

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("stem", [s for s in BLOCK_GOLDENS if s.startswith("IQ3")])
def test_blocks_match_llama_quantize(golden: Path, stem: str) -> None:
    identical, total = compare_blocks(golden, stem)
    assert total >= 1152
    # measured: every block identical in all four files, and in the whole 1536-column tensors of the
    # shared source (10,368 super-blocks per type, with and without imatrix)
    assert identical / total >= 0.999, f"{identical} of {total} blocks identical"


@pytest.mark.parametrize("file_type", ["IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"])
def test_file_types_match_llama_quantize(file_type: str, tmp_path: Path) -> None:
    """Whole files: IQ3_XS and IQ3_M are mixes over IQ3_XXS / IQ3_S (with Q4_K, Q5_K, Q6_K, IQ4_XS beside)."""
    assert file_matches(file_type, tmp_path)


@pytest.mark.parametrize(("qtype", "n_distances"), [(Q.IQ3_XXS, 2), (Q.IQ3_S, 3)])
def test_neighbour_lists(qtype: Q, n_distances: int) -> None:
    """Each code off the grid lists the grid points at its n smallest distances, nearest first, ties in grid order."""
    lat = lattice(qtype, n_distances)
    assert lat.levels.shape == (256 if qtype == Q.IQ3_XXS else 512, 4)
    for code in np.flatnonzero(lat.index_of < 0)[::7]:
        levels = (code >> (3 * np.arange(4))) & 7
        dist = ((lat.levels - levels) ** 2).sum(axis=1)
        listed = lat.neighbours[lat.first[code] : lat.first[code] + lat.count[code]]
        wanted = np.flatnonzero(dist <= np.unique(dist)[n_distances - 1])
        np.testing.assert_array_equal(listed, wanted[np.argsort(dist[wanted], kind="stable")])
    assert (lat.count[lat.index_of >= 0] == 0).all()


def test_best_neighbour_is_the_first_of_equals() -> None:
    """iq3_find_best_neighbour keeps the first of equal distances (strict <): with zero weights, the first listed."""
    lat = lattice(Q.IQ3_S, 3)
    codes = np.flatnonzero(lat.count > 1)[:50]
    x = np.ones((4, codes.size), np.float32)
    np.testing.assert_array_equal(best_neighbours(lat, codes, x, np.zeros_like(x), np.ones(codes.size, np.float32)),
                                  lat.neighbours[lat.first[codes]])
    # with weights, the nearest one at the given scale: exactly the grid point x / scale is on
    point = lat.neighbours[lat.first[codes] + 1]
    scale = np.full(codes.size, 0.5, np.float32)
    x = (2 * lat.levels[point].T + 1) * scale
    np.testing.assert_array_equal(best_neighbours(lat, codes, x, np.ones_like(x), scale), point)


def test_iq3_s_zero_sub_block_shifts_the_slots() -> None:
    """quantize_row_iq3_s_impl does not advance qs / signs past an all-zero sub-block: the later sub-blocks'
    grid indices and signs move up a slot and the last slot stays empty; their qh bits stay in place.
    Without an imatrix a sub-block's grid points depend on its own values only, so both layouts compare."""
    x = random_rows(5, 1, 256, "normal", 0.0)
    zeroed = x.copy()
    zeroed[0, 64:96] = 0.0
    full, gap = quantize_rows(x, Q.IQ3_S)[0], quantize_rows(zeroed, Q.IQ3_S)[0]
    qs, qh, signs = slice(2, 66), slice(66, 74), slice(74, 106)
    full_qs, gap_qs = full[qs].reshape(8, 8), gap[qs].reshape(8, 8)
    np.testing.assert_array_equal(gap_qs[[0, 1, 2, 3, 4, 5, 6]], full_qs[[0, 1, 3, 4, 5, 6, 7]])
    assert (gap_qs[7] == 0).all()
    full_signs, gap_signs = full[signs].reshape(8, 4), gap[signs].reshape(8, 4)
    np.testing.assert_array_equal(gap_signs[:7], full_signs[[0, 1, 3, 4, 5, 6, 7]])
    assert (gap_signs[7] == 0).all()
    assert gap[qh][2] == 0 and (gap[qh][[0, 1, 3, 4, 5, 6, 7]] == full[qh][[0, 1, 3, 4, 5, 6, 7]]).all()


@pytest.mark.parametrize(("qtype", "with_imatrix", "bound"), [
    (Q.IQ3_XXS, True, 0.20), (Q.IQ3_XXS, False, 0.23), (Q.IQ3_S, True, 0.15), (Q.IQ3_S, False, 0.18),
])
def test_round_trip_gaussian(qtype: Q, with_imatrix: bool, bound: float) -> None:
    """Relative RMS error of dequantize(quantize(x)) (gguf-py's dequantizer) on Gaussian rows, equal weights
    (measured 0.184, 0.214, 0.137, 0.168; without an imatrix the kernels weigh by x^2, not equally)."""
    assert gaussian_relative_rms(qtype, with_imatrix) < bound


@pytest.mark.parametrize("qtype", [Q.IQ3_XXS, Q.IQ3_S])
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["normal", "zeros", "constant", "sparse", "mixed"]),
    log_scale=st.floats(-12, 4),
    with_imatrix=st.booleans(),
)
def test_reconstruction_invariants(qtype: Q, seed: int, kind: str, log_scale: float, with_imatrix: bool) -> None:
    x = random_rows(seed, 2, 512, kind, log_scale)
    recon, blocks = round_trip_blocks(x, qtype, random_imatrix(seed, 512) if with_imatrix else None)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    assert np.isfinite(recon).all()
    assert (recon[amax[:, 0] == 0] == 0).all()
    # the top grid level (15) may exceed the block maximum a little; IQ3_XXS's sign trick may negate a value
    assert (np.abs(recon - blocks) <= 2.5 * amax + 2.0**-14).all()
