"""Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 against llama-quantize's own bytes, and reconstruction invariants."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings

import imatrix.quant  # noqa: F401  (registers the types)
from imatrix.quant.base import quant_type, quantize_rows
from quant_golden import (
    block_cases,
    check_reconstruction,
    compare_with_golden,
    plain_weights,
    random_imatrix,
    random_rows,
)

Q = gguf.GGMLQuantizationType
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# With an imatrix the weighted searches are the slow part; every other row keeps the test quick.
IM_ROW_STEP = {"Q4_1": 2, "Q5_1": 2}
# Worst-case |error| / block max|x| of the round-to-nearest `_ref` kernels (half a step, or a full
# step where the top level is clipped, plus fp16 rounding of the scale); weighted searches trade
# error between values, so for them only a loose bound holds.
REF_BOUND = {"Q8_0": 0.01, "Q4_0": 0.13, "Q4_1": 0.07, "Q5_0": 0.07, "Q5_1": 0.04}
WEIGHTED_BOUND = 1.0
# Gaussian data: relative RMS error each type should stay under.
RMS_BOUND = {"Q8_0": 0.008, "Q4_0": 0.12, "Q4_1": 0.1, "Q5_0": 0.06, "Q5_1": 0.05}


@pytest.mark.parametrize("type_name", LEGACY)
def test_matches_llama_quantize_without_imatrix(golden: Path, type_name: str) -> None:
    result = compare_with_golden(golden, type_name, with_imatrix=False, noim_weights=plain_weights)
    assert result.total > 100_000
    assert result.identical == result.total, f"{100 * result.fraction:.4f}% identical"


@pytest.mark.parametrize("type_name", LEGACY)
def test_matches_llama_quantize_with_imatrix(golden: Path, type_name: str) -> None:
    step = IM_ROW_STEP.get(type_name, 1)
    result = compare_with_golden(golden, type_name, with_imatrix=True, noim_weights=plain_weights, row_step=step)
    # measured: 100% identical for all five; any differing block may be at most 0.1% worse
    assert result.fraction >= 0.99, f"{100 * result.fraction:.4f}% identical"
    assert result.worst_excess <= 1e-3


@pytest.mark.parametrize("type_name", LEGACY)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_round_trip_gaussian(type_name: str, with_imatrix: bool) -> None:
    qtype = Q[type_name]
    x = random_rows(7, 16, 512, "normal", 0.0)
    qw = random_imatrix(7, 512) if with_imatrix else None
    recon = gguf.quants.dequantize(quantize_rows(x, qtype, qw), qtype)
    assert recon.shape == x.shape
    rel_rms = np.sqrt(np.mean((recon - x) ** 2) / np.mean(x**2))
    assert rel_rms < RMS_BOUND[type_name]


@pytest.mark.parametrize("type_name", LEGACY)
@settings(max_examples=40, deadline=None)
@given(**block_cases(3, 3))
def test_reconstruction_invariants(
    type_name: str, seed: int, n_rows: int, n_blocks: int, kind: str, log_scale: float, with_imatrix: bool
) -> None:
    n_cols = 32 * n_blocks
    x = random_rows(seed, n_rows, n_cols, kind, log_scale)
    qw = random_imatrix(seed, n_cols) if with_imatrix else None
    weighted = with_imatrix and type_name != "Q8_0"
    check_reconstruction(Q[type_name], x, qw, WEIGHTED_BOUND if weighted else REF_BOUND[type_name])


@pytest.mark.parametrize("type_name", LEGACY)
def test_block_kernel_is_a_one_block_row(type_name: str) -> None:
    """`quantize_blocks` on its own treats each block as a row of its own (sigma2 from the block)."""
    kind = quant_type(Q[type_name])
    x = random_rows(3, 6, 32, "normal", -1.0)
    qw = random_imatrix(3, 32)
    by_rows = quantize_rows(x, Q[type_name], qw)
    by_blocks = kind.quantize_blocks(x, np.broadcast_to(qw, x.shape))
    np.testing.assert_array_equal(by_rows, by_blocks)


def test_q4_0_zero_block_layout() -> None:
    """quantize_row_q4_0_ref stores d = 0/-8 = -0.0 and level 8 for an all-zero block."""
    out = quantize_rows(np.zeros((1, 32), np.float32), Q.Q4_0)
    assert out.tobytes() == b"\x00\x80" + b"\x88" * 16


def c_loop_extremes(block: np.ndarray) -> tuple[float, float, float, float]:
    """What ggml-quants.c's scalar loops find: amax and the first value reaching it (strict `>`),
    and min/max seeded with the first value."""
    amax, signed = 0.0, 0.0
    vmin = vmax = float(block[0])
    for value in block:
        if abs(value) > amax:
            amax, signed = abs(float(value)), float(value)
        vmin, vmax = min(vmin, float(value)), max(vmax, float(value))
    return amax, signed, vmin, vmax


def test_block_extremes_match_the_c_loops_on_ties_and_zeros() -> None:
    from imatrix.quant.blocks import min_max_blocks, signed_absmax_blocks, signed_absmax_groups

    rng = np.random.default_rng(7)
    blocks = rng.integers(-2, 3, (4000, 32)).astype(np.float32)  # +a and -a in most blocks
    blocks[:3] = 0.0
    blocks[1, 5] = -0.0
    blocks[2, 0] = -0.0
    blocks[3] = -0.0
    amax, signed = signed_absmax_blocks(blocks)
    columns_amax, columns_signed = signed_absmax_groups(np.ascontiguousarray(blocks.T))
    vmin, vmax = min_max_blocks(blocks)
    for index, block in enumerate(blocks):
        want_amax, want_signed, want_min, want_max = c_loop_extremes(block)
        assert amax[index] == columns_amax[index] == want_amax
        assert not np.signbit(amax[index]) and not np.signbit(columns_amax[index])
        assert signed[index] == columns_signed[index] == want_signed
        assert not np.signbit(signed[index]) or want_signed < 0
        assert vmin[index] == want_min and vmax[index] == want_max
