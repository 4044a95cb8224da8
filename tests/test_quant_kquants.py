"""Q2_K..Q6_K against llama-quantize's own bytes, and reconstruction invariants on synthetic data."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import example, given, settings

import imatrix.quant  # noqa: F401  (registers the types)
from imatrix.quant.base import quant_type, quantize_rows
from imatrix.quant.blocks import to_groups
from imatrix.quant.searches import make_qkx_quants
from quant_golden import (
    Comparison,
    block_cases,
    block_errors,
    check_reconstruction,
    imatrix_rows,
    random_imatrix,
    random_rows,
    source_tensors,
)

Q = gguf.GGMLQuantizationType
# golden file -> the K type llama-quantize gave its ffn_down tensors (checked below); the other
# tensors of those files fall back to legacy types, tested elsewhere
GOLDEN_FILES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}
K_TYPES = list(GOLDEN_FILES)
# Worst |error| / block max|x| of the unweighted kernels, over 9000 Gaussian, sparse and half-zero
# blocks: 0.37, 0.23, 0.093, 0.051, 0.016 (the 99th percentiles are a third lower: the tail is long,
# so the bounds carry a wide margin). With an imatrix, values of zero weight may land anywhere in
# the block's range, so only a loose bound holds.
REF_BOUND = {"Q2_K": 0.5, "Q3_K": 0.3, "Q4_K": 0.12, "Q5_K": 0.07, "Q6_K": 0.02}
WEIGHTED_BOUND = 2.0
# Absolute slack for fp16 rounding of tiny (subnormal) super-block scales: half an fp16 subnormal
# step times the largest scale * level product (Q6_K: 127 * 32).
ABS_TOL = 2.0**-12
# Gaussian data with 1% outliers at 8 sigma: relative RMS error each type should stay under
# (measured 0.34, 0.20, 0.090, 0.045, 0.026). A random imatrix spanning six decades shifts error
# onto unimportant columns, so the plain RMS error grows (measured 0.40, 0.26, 0.14, 0.062, 0.072).
RMS_BOUND = {"Q2_K": 0.37, "Q3_K": 0.22, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03}
RMS_BOUND_IM = {"Q2_K": 0.44, "Q3_K": 0.29, "Q4_K": 0.16, "Q5_K": 0.07, "Q6_K": 0.08}


def compare_k_tensors(golden: Path, type_name: str, with_imatrix: bool) -> Comparison:
    """Quantize the K-quant tensors of a golden file ourselves and compare block by block."""
    qtype = Q[type_name]
    mode = "im" if with_imatrix else "noim"
    reader = gguf.GGUFReader(golden / "quant" / f"{GOLDEN_FILES[type_name]}-{mode}.gguf")
    tensors = [t for t in reader.tensors if t.tensor_type == qtype]
    assert {t.name for t in tensors} == {f"blk.{i}.ffn_down.weight" for i in (0, 5, 29)}
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    result = Comparison()
    for tensor in tensors:
        x = source_tensors(golden)[tensor.name]
        qw = imatrix_rows(golden)[tensor.name] if with_imatrix else None
        ours = quantize_rows(x, qtype, qw).reshape(-1, type_size)
        theirs = np.asarray(tensor.data).reshape(-1, type_size)
        same = (ours == theirs).all(axis=1)
        result.identical += int(same.sum())
        result.total += same.size
        if not same.all():
            w = np.broadcast_to(qw, x.shape) if qw is not None else np.ones_like(x)
            ours_err = block_errors(x, ours, qtype, w)[~same]
            theirs_err = block_errors(x, theirs, qtype, w)[~same]
            excess = (ours_err - theirs_err) / np.maximum(theirs_err, 1e-30)
            result.worst_excess = max(result.worst_excess, float(excess.max()))
    return result


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["noim", "im"])
@pytest.mark.parametrize("type_name", K_TYPES)
def test_matches_llama_quantize(golden: Path, type_name: str, with_imatrix: bool) -> None:
    result = compare_k_tensors(golden, type_name, with_imatrix)
    assert result.total == 3 * 576 * 6
    # measured: 100% identical for all five types, with and without imatrix
    assert result.fraction >= 0.99, f"{100 * result.fraction:.4f}% identical"
    assert result.worst_excess <= 1e-3


def gaussian_with_outliers(seed: int, n_rows: int, n_cols: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols))
    spots = rng.random(x.shape) < 0.01
    x[spots] *= 8.0
    return x.astype(np.float32)


def weighted_error(x: np.ndarray, qtype: gguf.GGMLQuantizationType, qw: np.ndarray | None, w: np.ndarray) -> float:
    recon = gguf.quants.dequantize(quantize_rows(x, qtype, qw), qtype)
    return float((w * (recon.astype(np.float64) - x) ** 2).sum())


@pytest.mark.parametrize("type_name", K_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["noim", "im"])
def test_round_trip_gaussian(type_name: str, with_imatrix: bool) -> None:
    qtype = Q[type_name]
    x = gaussian_with_outliers(5, 16, 1024)
    qw = random_imatrix(5, 1024) if with_imatrix else None
    recon = gguf.quants.dequantize(quantize_rows(x, qtype, qw), qtype)
    assert recon.shape == x.shape and np.isfinite(recon).all()
    rel_rms = np.sqrt(np.mean((recon - x) ** 2) / np.mean(x**2))
    assert rel_rms < (RMS_BOUND_IM if with_imatrix else RMS_BOUND)[type_name]


@pytest.mark.parametrize("type_name", K_TYPES)
def test_imatrix_lowers_weighted_error(type_name: str) -> None:
    """Weighting by the imatrix trades error towards unimportant columns."""
    qtype = Q[type_name]
    x = gaussian_with_outliers(11, 32, 1024)
    rng = np.random.default_rng(12)
    qw = (rng.lognormal(0.0, 1.5, 1024) * (rng.random(1024) < 0.9)).astype(np.float32)
    w = np.broadcast_to(qw, x.shape)
    assert weighted_error(x, qtype, qw, w) < weighted_error(x, qtype, None, w)


@pytest.mark.parametrize("type_name", K_TYPES)
def test_special_blocks(type_name: str) -> None:
    """All-zero blocks give zeros, constant blocks come back almost exactly, with and without weights."""
    qtype = Q[type_name]
    x = np.zeros((4, 256), np.float32)
    x[1] = 0.75
    x[2] = -3.5
    x[3, 17] = -2.0
    for qw in (None, np.full(256, 0.5, np.float32)):
        recon = gguf.quants.dequantize(quantize_rows(x, qtype, qw), qtype)
        assert (recon[0] == 0).all()
        np.testing.assert_allclose(recon[1:3], x[1:3], rtol=2.0**-9)
        assert abs(recon[3, 17] + 2.0) <= REF_BOUND[type_name] * 2.0


@pytest.mark.parametrize("type_name", K_TYPES)
@settings(max_examples=30, deadline=None)
@given(**block_cases(2, 2))
@example(seed=142, n_rows=1, n_blocks=2, kind="sparse", log_scale=0.0, with_imatrix=False)  # a zero-laden Q2_K block
def test_reconstruction_invariants(
    type_name: str, seed: int, n_rows: int, n_blocks: int, kind: str, log_scale: float, with_imatrix: bool
) -> None:
    n_cols = 256 * n_blocks
    x = random_rows(seed, n_rows, n_cols, kind, log_scale)
    qw = random_imatrix(seed, n_cols) if with_imatrix else None
    # quantize_row_q2_K_ref weighs each value by |x|, and its sub-block minimum may be negative: without an
    # imatrix, the exact zeros of a Q2_K block carry no weight and may land anywhere in their sub-block's range
    weightless = (x == 0) if type_name == "Q2_K" and qw is None else None
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        check_reconstruction(Q[type_name], x, qw, WEIGHTED_BOUND if with_imatrix else REF_BOUND[type_name], ABS_TOL,
                             weightless)


@pytest.mark.parametrize("type_name", K_TYPES)
def test_block_kernel_matches_rows(type_name: str) -> None:
    """Everything is per super-block: `quantize_blocks` on tiled weights equals row quantization."""
    kind = quant_type(Q[type_name])
    x = random_rows(3, 3, 512, "normal", -1.0)
    qw = random_imatrix(3, 512)
    by_rows = quantize_rows(x, Q[type_name], qw).reshape(-1, kind.type_size)
    by_blocks = kind.quantize_blocks(x.reshape(-1, 256), np.broadcast_to(qw, x.shape).reshape(-1, 256))
    np.testing.assert_array_equal(by_rows, by_blocks)


# (nmax, rmin, rdelta, nstep, use_mad): the searches of Q2_K, Q4_K and Q5_K with and without an imatrix, and
# one whose trial scales change sign (no caller's: its levels move both ways, compared whole)
QKX_SEARCHES = [(3, -0.5, 0.1, 15, True), (3, -0.9, 0.05, 36, False), (15, -1.0, 0.1, 20, False),
                (31, -0.5, 0.1, 15, False), (31, -0.9, 0.05, 36, False), (3, -3.5, 0.2, 30, False)]


@pytest.mark.parametrize("search", QKX_SEARCHES)
@settings(max_examples=20, deadline=None)
@given(**block_cases(4, 2))
def test_qkx_search_skipping_unchanged_groups_changes_nothing(
    search: tuple, seed: int, n_rows: int, n_blocks: int, kind: str, log_scale: float, with_imatrix: bool
) -> None:
    """`make_qkx_quants` fits only the groups whose levels moved since their last trial: the same bits as
    fitting every group at every trial."""
    x = to_groups(random_rows(seed, n_rows, 256 * n_blocks, kind, log_scale).reshape(-1, 256), 16)
    w = np.abs(x) + np.float32(1e-3) if not with_imatrix else to_groups(
        np.broadcast_to(random_imatrix(seed, 256 * n_blocks), (n_rows, 256 * n_blocks)).reshape(-1, 256), 16)
    skipping = make_qkx_quants(x, w, *search)
    every_trial = make_qkx_quants(x, w, *search, skip_unchanged=False)
    for ours, full in zip(skipping, every_trial, strict=True):
        np.testing.assert_array_equal(ours, full)
