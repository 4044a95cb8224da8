"""IQ4_NL and IQ4_XS against llama-quantize's own bytes, and reconstruction invariants."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings

import imatrix.quant  # noqa: F401  (registers the types)
from imatrix.quant.base import quantize_rows
from imatrix.quant.iq4 import KVALUES, best_index
from quant_golden import (
    ABS_TOL,
    block_cases,
    check_reconstruction,
    compare_with_golden,
    random_imatrix,
    random_rows,
    square_weights,
)

Q = gguf.GGMLQuantizationType
# Every other row: the 15-candidate scale search is the slow part.
ROW_STEP = 2
# The IQ4_XS files hold IQ4_NL for the 576-column tensors (llama-quantize's fallback), so both
# types are checked against both files; each tensor's type comes from the file.
FILES = ["IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("type_name", FILES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_matches_llama_quantize(golden: Path, type_name: str, with_imatrix: bool) -> None:
    # without imatrix, llama.cpp's search weighs each value by x^2, so differing blocks are judged by that
    result = compare_with_golden(golden, type_name, with_imatrix, noim_weights=square_weights, row_step=ROW_STEP)
    assert result.total > 20_000
    # measured: 100% identical in all four files
    assert result.fraction >= 0.99, f"{100 * result.fraction:.4f}% identical"
    assert result.worst_excess <= 1e-3


def test_best_index_prefers_nearest_and_upper_on_ties() -> None:
    levels = KVALUES.astype(np.float32)
    x = np.array([-200, -127, -115.5, -115, 0, 0.999, 1, 7, 113, 500], dtype=np.float32)
    expected = np.abs(x[:, None] - levels[None, :]).argmin(axis=1)
    expected[[2, 7]] = [1, 9]  # halfway points (-115.5, 7): best_index_int8 takes the upper level
    np.testing.assert_array_equal(best_index(x), expected)


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_round_trip_gaussian(type_name: str, with_imatrix: bool) -> None:
    qtype = Q[type_name]
    x = random_rows(11, 16, 512, "normal", 0.0)
    qw = random_imatrix(11, 512) if with_imatrix else None
    recon = gguf.quants.dequantize(quantize_rows(x, qtype, qw), qtype)
    assert recon.shape == x.shape
    rel_rms = np.sqrt(np.mean((recon - x) ** 2) / np.mean(x**2))
    assert rel_rms < 0.12


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
@settings(max_examples=40, deadline=None)
@given(**block_cases(3, 2))
def test_reconstruction_invariants(
    type_name: str, seed: int, n_rows: int, n_blocks: int, kind: str, log_scale: float, with_imatrix: bool
) -> None:
    qtype = Q[type_name]
    n_cols = gguf.GGML_QUANT_SIZES[qtype][0] * n_blocks
    x = random_rows(seed, n_rows, n_cols, kind, log_scale)
    qw = random_imatrix(seed, n_cols) if with_imatrix else None
    # the scale is a weighted least-squares fit, so only a loose bound relative to the block max holds;
    # IQ4_XS multiplies its fp16 super-block scale by 6-bit codes up to 32, which scales its rounding too
    abs_tol = ABS_TOL * (32 if type_name == "IQ4_XS" else 1)
    check_reconstruction(qtype, x, qw, 1.0, abs_tol)


def test_iq4_xs_zero_super_block_layout() -> None:
    """An all-zero super-block: d = -0/32 = -0.0, scale codes 0 (stored +32), every value at level 1."""
    out = quantize_rows(np.zeros((1, 256), np.float32), Q.IQ4_XS)[0]
    assert out[:2].tobytes() == b"\x00\x80"
    assert out[2:4].view("<u2")[0] == 0xAAAA and (out[4:8] == 0).all() and (out[8:] == 0x88).all()
