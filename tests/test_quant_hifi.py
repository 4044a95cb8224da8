"""Q3_K_HIFI: layout, round trip, and lower error than plain Q3_K on SmolLM2's ffn_down tensors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings

import imatrix.quant  # noqa: F401  (registers the types)
from imatrix.quant.base import quant_type, quantize_rows
from imatrix.quant.hifi import HIFI_TYPE_ID, N_OUTLIERS, Q3_K_HIFI, Q3_K_SIZE, dequantize_q3_k_hifi
from quant_golden import block_cases, imatrix_rows, random_imatrix, random_rows, source_tensors

Q3_K = gguf.GGMLQuantizationType.Q3_K
FFN_DOWN = [f"blk.{i}.ffn_down.weight" for i in (0, 5, 29)]


def test_registered_outside_ggml_range() -> None:
    assert quant_type(HIFI_TYPE_ID) is Q3_K_HIFI
    assert int(HIFI_TYPE_ID) not in {int(t) for t in gguf.GGMLQuantizationType}
    assert (Q3_K_HIFI.block_size, Q3_K_HIFI.type_size) == (256, 110 + 3 * N_OUTLIERS)


def test_layout() -> None:
    """Q3_K of the block with its outliers zeroed, then ascending positions, then exact fp16 values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    spots = [5, 77, 255, 256, 300, 511]
    x[:, spots] = np.float32(12.5)
    out = quantize_rows(x, HIFI_TYPE_ID).reshape(-1, Q3_K_HIFI.type_size)
    idx = out[:, Q3_K_SIZE : Q3_K_SIZE + N_OUTLIERS].astype(np.intp)
    assert (np.diff(idx, axis=1) > 0).all()
    blocks = x.reshape(-1, 256)
    values = np.ascontiguousarray(out[:, Q3_K_SIZE + N_OUTLIERS :]).view(np.float16)
    np.testing.assert_array_equal(values, np.take_along_axis(blocks, idx, axis=1).astype(np.float16))
    assert set(idx[0].tolist()) >= {5, 77, 255} and set(idx[1].tolist()) >= {0, 44, 255}
    zeroed = blocks.copy()
    np.put_along_axis(zeroed, idx, 0.0, axis=1)
    np.testing.assert_array_equal(out[:, :Q3_K_SIZE], quantize_rows(zeroed, Q3_K).reshape(-1, Q3_K_SIZE))


def test_imatrix_picks_important_outliers() -> None:
    """With an imatrix, importance is |x| * imatrix: a large value in a dead column is not kept."""
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    x[0, 10] = 50.0
    qw = np.ones(256, np.float32)
    qw[10] = 0.0
    idx = quantize_rows(x, HIFI_TYPE_ID, qw)[0, Q3_K_SIZE : Q3_K_SIZE + N_OUTLIERS]
    assert 10 not in idx.tolist()
    assert 10 in quantize_rows(x, HIFI_TYPE_ID)[0, Q3_K_SIZE : Q3_K_SIZE + N_OUTLIERS].tolist()


def weighted_error(x: np.ndarray, recon: np.ndarray, w: np.ndarray) -> float:
    return float((w * (recon.astype(np.float64) - x) ** 2).sum())


@pytest.mark.parametrize("name", FFN_DOWN)
def test_beats_q3_k_on_ffn_down(golden: Path, name: str) -> None:
    x = source_tensors(golden)[name][::2]
    qw = imatrix_rows(golden)[name]
    w = np.broadcast_to(qw, x.shape)
    hifi = dequantize_q3_k_hifi(quantize_rows(x, HIFI_TYPE_ID, qw))
    plain = gguf.quants.dequantize(quantize_rows(x, Q3_K, qw), Q3_K)
    assert hifi.shape == x.shape
    assert weighted_error(x, hifi, w) <= weighted_error(x, plain, w)
    ones = np.ones_like(x)
    hifi_noim = dequantize_q3_k_hifi(quantize_rows(x, HIFI_TYPE_ID))
    plain_noim = gguf.quants.dequantize(quantize_rows(x, Q3_K), Q3_K)
    assert weighted_error(x, hifi_noim, ones) <= weighted_error(x, plain_noim, ones)


@settings(max_examples=40, deadline=None)
@given(**block_cases(2, 2))
def test_round_trip_invariants(
    seed: int, n_rows: int, n_blocks: int, kind: str, log_scale: float, with_imatrix: bool
) -> None:
    n_cols = 256 * n_blocks
    x = random_rows(seed, n_rows, n_cols, kind, log_scale)
    qw = random_imatrix(seed, n_cols) if with_imatrix else None
    out = quantize_rows(x, HIFI_TYPE_ID, qw)
    assert out.dtype == np.uint8 and out.shape == (n_rows, n_blocks * Q3_K_HIFI.type_size)
    recon = dequantize_q3_k_hifi(out)
    assert recon.shape == x.shape and np.isfinite(recon).all()
    blocks, rblocks = x.reshape(-1, 256), recon.reshape(-1, 256)
    assert (rblocks[(blocks == 0).all(axis=1)] == 0).all()
    idx = out.reshape(-1, Q3_K_HIFI.type_size)[:, Q3_K_SIZE : Q3_K_SIZE + N_OUTLIERS].astype(np.intp)
    kept = np.take_along_axis(blocks, idx, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(rblocks, idx, axis=1), kept.astype(np.float16))
