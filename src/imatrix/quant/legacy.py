"""Legacy 32-value block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, bit-compatible with llama.cpp.

Without an imatrix llama.cpp uses its `quantize_row_*_ref` round-to-nearest kernels; with one it
searches the scale (`make_qx_quants` for the symmetric types, `make_qkx3_quants` for the ones with a
minimum) under per-value weights `imatrix * sqrt(sigma2 + x^2)`, `sigma2` being the row's mean x^2.

Bit-exactness notes: ggml-quants.c is built without FMA or fast-math, so every expression is plain
float32 arithmetic in source order, and every sum is sequential (see `blocks.py`, whose operations these
kernels are built from; the scale searches are `searches.py`'s).
"""

from __future__ import annotations

import gguf
import numpy as np

from imatrix.quant import searches
from imatrix.quant.base import QuantType
from imatrix.quant.blocks import (
    F32,
    fp16_bytes,
    in_steps,
    min_max_blocks,
    pack_bit4,
    pack_nibbles,
    reciprocal_where_nonzero,
    signed_absmax_blocks,
    sum_blocks,
    to_groups,
)


def row_sigma2(rows: np.ndarray) -> np.ndarray:
    """Mean of x^2 over each row, summed sequentially (the `sigma2` of the `quantize_row_*_impl` functions)."""
    return sum_blocks(rows * rows) / F32(rows.shape[-1])


def importance(blocks: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """llama.cpp's per-value weight `qw * sqrt(sigma2 + x^2)`; `sigma2` is one value per block."""
    return qw * np.sqrt(sigma2[:, None] + blocks * blocks)


# ----------------------------------------------------------------------------- scale searches


def make_qx_quants(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weighted scale search (llama.cpp `make_qx_quants`, rmse_type 1 with weights).

    Returns `(scale [n], levels [n, 32])` with levels in `[0, 2*nmax)`; all-zero blocks give 0, 0.
    """
    return in_steps(lambda x, w: _make_qx_quants(x, w, nmax), blocks, weights)


def _make_qx_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    # the search takes groups, C-contiguous so that its in-order sums take numpy's fast path
    scale, levels = searches.make_qx_quants(to_groups(x, x.shape[-1]), nmax, to_groups(w, w.shape[-1]))
    return scale, levels.T.astype(np.uint8)


def make_qkx3_quants(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted scale+min search (llama.cpp `make_qkx3_quants`, rmin -0.9, rdelta 0.05, 36 steps, squared error).

    Returns `(scale, min, levels [n, 32])` where the value is `scale * level + min`.
    """
    return in_steps(lambda x, w: _make_qkx3_quants(x, w, nmax), blocks, weights)


def _make_qkx3_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # the search takes groups and returns the negated min
    x_groups, w_groups = to_groups(x, x.shape[-1]), to_groups(w, w.shape[-1])
    scale, negated_min, levels = searches.make_qkx_quants(x_groups, w_groups, nmax, -0.9, 0.05, 36, use_mad=False)
    return scale, -negated_min, levels.T.astype(np.uint8)


# ----------------------------------------------------------------------------- types


class _Legacy(QuantType):
    """Common driver: the ref kernel without imatrix, the weighted search with one."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        """Blocks on their own: with weights, each block stands in for a whole row when computing sigma2."""
        blocks = np.asarray(blocks, dtype=F32)
        if weights is None:
            return cls.ref_blocks(blocks)
        weights = np.asarray(weights, dtype=F32)
        return cls.weighted_blocks(blocks, importance(blocks, weights, row_sigma2(blocks)))

    @classmethod
    def quantize(cls, rows: np.ndarray, imatrix_row: np.ndarray | None) -> np.ndarray:
        n_rows, n_cols = rows.shape
        rows = np.asarray(rows, dtype=F32)
        blocks = rows.reshape(-1, cls.block_size)
        if imatrix_row is None:
            return cls.ref_blocks(blocks).reshape(n_rows, -1)
        qw = np.broadcast_to(np.asarray(imatrix_row, dtype=F32), (n_rows, n_cols)).reshape(-1, cls.block_size)
        sigma2 = np.repeat(row_sigma2(rows), n_cols // cls.block_size)
        return cls.weighted_blocks(blocks, importance(blocks, qw, sigma2)).reshape(n_rows, -1)

    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def weighted_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """`weights` are the final per-value weights (imatrix times sqrt(sigma2 + x^2))."""
        raise NotImplementedError


def _symmetric_ref(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_row_q4_0_ref` / `q5_0_ref`: scale max/-nmax, levels trunc(x/d + nmax + 0.5) capped at 2*nmax-1."""
    _, vmax = signed_absmax_blocks(blocks)
    d = vmax / F32(-nmax)
    inv = reciprocal_where_nonzero(d)
    # x/d lies in [-nmax, nmax], so the argument is positive and the uint8 cast is C's truncation
    levels = (blocks * inv[:, None] + F32(nmax + 0.5)).astype(np.uint8)
    return d, np.minimum(levels, np.uint8(2 * nmax - 1))


def _affine_ref(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_row_q4_1_ref` / `q5_1_ref`: scale (max-min)/nmax, levels trunc((x-min)/d + 0.5)."""
    vmin, vmax = min_max_blocks(blocks)
    d = (vmax - vmin) / F32(nmax)
    inv = reciprocal_where_nonzero(d)
    # (x-min)/d lies in [0, nmax]: a positive argument, truncated by the uint8 cast as C's cast does
    levels = ((blocks - vmin[:, None]) * inv[:, None] + F32(0.5)).astype(np.uint8)
    return d, vmin, np.minimum(levels, np.uint8(nmax))


class Q8_0(_Legacy, qtype=gguf.GGMLQuantizationType.Q8_0):
    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        amax, _ = signed_absmax_blocks(blocks)
        d = amax / F32(127)
        scaled = blocks * reciprocal_where_nonzero(d)[:, None]
        # C roundf: halves away from zero (np.rint would round them to even); |scaled| <= 127, so
        # the int8 cast is an exact truncation
        whole = scaled.astype(np.int8)
        frac = scaled - whole
        q = whole + (frac >= F32(0.5)).view(np.int8) - (frac <= F32(-0.5)).view(np.int8)
        return np.concatenate([fp16_bytes(d), q.view(np.uint8)], axis=1)

    @classmethod
    def weighted_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # quantize_q8_0 ignores the imatrix
        return cls.ref_blocks(blocks)


class Q4_0(_Legacy, qtype=gguf.GGMLQuantizationType.Q4_0):
    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, levels = _symmetric_ref(blocks, 8)
        return np.concatenate([fp16_bytes(d), pack_nibbles(levels)], axis=1)

    @classmethod
    def weighted_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        d, levels = make_qx_quants(blocks, weights, 8)
        return np.concatenate([fp16_bytes(d), pack_nibbles(levels)], axis=1)


class Q5_0(_Legacy, qtype=gguf.GGMLQuantizationType.Q5_0):
    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, levels = _symmetric_ref(blocks, 16)
        return np.concatenate([fp16_bytes(d), pack_bit4(levels), pack_nibbles(levels)], axis=1)

    @classmethod
    def weighted_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        d, levels = make_qx_quants(blocks, weights, 16)
        return np.concatenate([fp16_bytes(d), pack_bit4(levels), pack_nibbles(levels)], axis=1)


class Q4_1(_Legacy, qtype=gguf.GGMLQuantizationType.Q4_1):
    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._pack(*_affine_ref(blocks, 15))

    @classmethod
    def weighted_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return cls._pack(*make_qkx3_quants(blocks, weights, 15))

    @staticmethod
    def _pack(d: np.ndarray, vmin: np.ndarray, levels: np.ndarray) -> np.ndarray:
        return np.concatenate([fp16_bytes(d), fp16_bytes(vmin), pack_nibbles(levels)], axis=1)


class Q5_1(_Legacy, qtype=gguf.GGMLQuantizationType.Q5_1):
    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._pack(*_affine_ref(blocks, 31))

    @classmethod
    def weighted_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return cls._pack(*make_qkx3_quants(blocks, weights, 31))

    @staticmethod
    def _pack(d: np.ndarray, vmin: np.ndarray, levels: np.ndarray) -> np.ndarray:
        parts = [fp16_bytes(d), fp16_bytes(vmin), pack_bit4(levels), pack_nibbles(levels)]
        return np.concatenate(parts, axis=1)
