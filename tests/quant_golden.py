"""Helpers for the quantization tests: llama-quantize's golden blocks and block-wise comparisons."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from hypothesis import strategies as st

from imatrix import ImportanceMatrix
from imatrix.quant.base import quantize_rows

IMATRIX = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"

# Noise weights for comparing a differing block: the imatrix with one, else what llama.cpp's kernel
# itself minimizes without one (x^2 for the IQ4 searches; the round-to-nearest `_ref` kernels
# minimize nothing in particular, so plain squared error).
ErrorWeights = Callable[[np.ndarray], np.ndarray]


def plain_weights(x: np.ndarray) -> np.ndarray:
    return np.ones_like(x)


def square_weights(x: np.ndarray) -> np.ndarray:
    return x * x


@functools.cache
def source_tensors(golden: Path) -> dict[str, np.ndarray]:
    """The F16 source tensors as float32, exactly what llama-quantize feeds its kernels."""
    reader = gguf.GGUFReader(golden / "quant" / "source-f16.gguf")
    return {t.name: np.asarray(t.data).astype(np.float32) for t in reader.tensors}


@functools.cache
def imatrix_rows(golden: Path) -> dict[str, np.ndarray]:
    """Per-column sums/counts, as llama-quantize's `load_imatrix` normalises a GGUF imatrix."""
    matrix = ImportanceMatrix.load(golden / IMATRIX)
    return {name: matrix[name].mean_sq()[0] for name in matrix}


@dataclass
class Comparison:
    identical: int = 0
    total: int = 0
    worst_excess: float = 0.0  # max over differing blocks of (our error / llama.cpp's error) - 1

    @property
    def fraction(self) -> float:
        return self.identical / self.total


def block_errors(x: np.ndarray, blocks: np.ndarray, qtype: gguf.GGMLQuantizationType, w: np.ndarray) -> np.ndarray:
    """Weighted squared error of each block of `blocks` (uint8 rows of one tensor) against `x`."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    recon = gguf.quants.dequantize(blocks.reshape(-1, type_size), qtype).reshape(-1, block_size)
    diff = (recon.astype(np.float64) - x.reshape(-1, block_size)) ** 2
    return (w.reshape(-1, block_size) * diff).sum(axis=1)


def compare_with_golden(
    golden: Path, type_name: str, with_imatrix: bool, noim_weights: ErrorWeights, row_step: int = 1
) -> Comparison:
    """Quantize every tensor of `<type_name>-(im|noim).gguf` (every `row_step`-th row) and compare blocks.

    Rows are quantized independently by llama.cpp, so a subset of rows is still an exact comparison.
    """
    sources = source_tensors(golden)
    mode = "im" if with_imatrix else "noim"
    result = Comparison()
    for tensor in gguf.GGUFReader(golden / "quant" / f"{type_name}-{mode}.gguf").tensors:
        qtype = tensor.tensor_type
        x = sources[tensor.name][::row_step]
        qw = imatrix_rows(golden)[tensor.name] if with_imatrix else None
        ours = quantize_rows(x, qtype, qw)
        theirs = np.asarray(tensor.data)[::row_step]
        type_size = gguf.GGML_QUANT_SIZES[qtype][1]
        same = (ours.reshape(-1, type_size) == theirs.reshape(-1, type_size)).all(axis=1)
        result.identical += int(same.sum())
        result.total += same.size
        if not same.all():
            w = np.broadcast_to(qw, x.shape) if qw is not None else noim_weights(x)
            ours_err = block_errors(x, ours, qtype, w)[~same]
            theirs_err = block_errors(x, theirs, qtype, w)[~same]
            excess = (ours_err - theirs_err) / np.maximum(theirs_err, 1e-30)
            result.worst_excess = max(result.worst_excess, float(excess.max()))
    return result


# ----------------------------------------------------------------------------- random blocks

# Half of fp16's smallest subnormal times the largest level (127), with margin: the absolute error a
# scale rounded to fp16 can add on top of the relative bounds.
ABS_TOL = 2.0**-17
# A value of zero weight may be rounded to anything in its (sub-)block's range.
WEIGHTLESS_BOUND = 2.0


def block_cases(max_rows: int, max_blocks: int) -> dict[str, st.SearchStrategy]:
    """Hypothesis arguments for `random_rows` / `random_imatrix`: shapes, data kinds and magnitudes."""
    return {
        "seed": st.integers(0, 2**32 - 1),
        "n_rows": st.integers(1, max_rows),
        "n_blocks": st.integers(1, max_blocks),
        "kind": st.sampled_from(["normal", "zeros", "constant", "sparse", "mixed"]),
        "log_scale": st.floats(-30, 4),
        "with_imatrix": st.booleans(),
    }


def random_rows(seed: int, n_rows: int, n_cols: int, kind: str, log_scale: float) -> np.ndarray:
    """Rows whose blocks are Gaussian, all zero, constant, or mostly zero, at magnitude 10**log_scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols))
    if kind == "zeros":
        x[:] = 0.0
    elif kind == "constant":
        x[:] = x[0, 0]
    elif kind == "sparse":
        x[rng.random(x.shape) < 0.9] = 0.0
    elif kind == "mixed":
        x[:, : n_cols // 2] = 0.0
    return (x * 10.0**log_scale).astype(np.float32)


def random_imatrix(seed: int, n_cols: int) -> np.ndarray:
    """Non-negative column weights spanning decades, some exactly zero."""
    rng = np.random.default_rng(seed + 1)
    qw = 10.0 ** rng.uniform(-4, 2, n_cols)
    qw[rng.random(n_cols) < 0.1] = 0.0
    return qw.astype(np.float32)


def check_reconstruction(
    qtype: gguf.GGMLQuantizationType,
    x: np.ndarray,
    qw: np.ndarray | None,
    rel_bound: float,
    abs_tol: float = ABS_TOL,
    weightless: np.ndarray | None = None,
) -> None:
    """Invariants of any kernel: right bytes, finite values, exact zeros, near-exact constants, bounded error.

    `weightless` marks the values the kernel itself gives no weight: those need only stay within
    WEIGHTLESS_BOUND of their block's largest magnitude.
    """
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = quantize_rows(x, qtype, qw)
    assert out.dtype == np.uint8 and out.shape == (x.shape[0], x.shape[1] // block_size * type_size)
    recon = gguf.quants.dequantize(out, qtype).reshape(-1, block_size).astype(np.float64)
    blocks = x.reshape(-1, block_size).astype(np.float64)
    assert np.isfinite(recon).all()
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    err = np.abs(recon - blocks)
    bound = np.broadcast_to(rel_bound * amax + abs_tol, blocks.shape)
    weighed = np.ones(blocks.shape, bool) if weightless is None else ~weightless.reshape(blocks.shape)
    assert (err[weighed] <= bound[weighed]).all(), float((err - bound)[weighed].max())
    assert (err <= WEIGHTLESS_BOUND * amax + abs_tol).all()
    zero = amax[:, 0] == 0
    assert (recon[zero] == 0).all()
    constant = (blocks == blocks[:, :1]).all(axis=1) & ~zero
    if qw is not None:
        constant &= (np.broadcast_to(qw, x.shape).reshape(-1, block_size) > 0).all(axis=1)
    assert (err[constant] <= 2.0**-9 * amax[constant] + abs_tol).all()
