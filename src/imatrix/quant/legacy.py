"""Legacy 32-value block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, bit-compatible with llama.cpp.

Without an imatrix llama.cpp uses its `quantize_row_*_ref` round-to-nearest kernels; with one it
searches the scale (`make_qx_quants` for the symmetric types, `make_qkx3_quants` for the ones with a
minimum) under per-value weights `imatrix * sqrt(sigma2 + x^2)`, `sigma2` being the row's mean x^2.

Bit-exactness notes: ggml-quants.c is built without FMA or fast-math, so every expression is plain
float32 arithmetic in source order, and every sum is sequential; `seq_sum` adds left to right
(numpy's `sum` would add pairwise and round differently).
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

from imatrix.quant import kquants_search
from imatrix.quant.base import QuantType

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
# Blocks handled per vectorized step of a scale search: bounds the [blocks, candidates, 32] temporaries.
CHUNK = 2048


# ----------------------------------------------------------------------------- shared helpers


def seq_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the last axis strictly left to right in float32, like a C `for` loop."""
    values = np.asarray(values, dtype=F32)
    if values.shape[-1] == 0:
        return np.zeros(values.shape[:-1], dtype=F32)
    total = values[..., 0].copy()
    for j in range(1, values.shape[-1]):
        total += values[..., j]
    return total


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 `[n]` to ggml half bytes `[n, 2]` (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.ascontiguousarray(np.asarray(values, dtype=F32).astype(np.float16)).view(np.uint8).reshape(-1, 2)


def safe_reciprocal(values: np.ndarray) -> np.ndarray:
    """`v ? 1/v : 0` elementwise in float32."""
    values = np.asarray(values, dtype=F32)
    out = np.zeros_like(values)
    np.divide(F32(1), values, out=out, where=values != 0)
    return out


def safe_divide(num: np.ndarray, den: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """`ok ? num/den : 0` elementwise in float32, without warnings where `ok` is false."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=F32)
    np.divide(num, den, out=out, where=ok)
    return out


def block_major(blocks: np.ndarray) -> np.ndarray:
    """Blocks `[..., block]` copied as `[block, n_blocks]`: numpy reduces a short contiguous axis ~8×
    slower than across rows, so per-block extremes are taken over this copy's first axis."""
    return np.ascontiguousarray(blocks.reshape(-1, blocks.shape[-1]).T)


def signed_extreme(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block: largest |x| and the signed value that first reaches it (0.0 for an all-zero block).

    The C loops only update on a strictly larger |x|, so the first occurrence wins and an all-zero
    block keeps the initial +0.0 (which matters for the sign of a zero fp16 scale).
    """
    amax, signed = kquants_search.signed_absmax(block_major(blocks))
    return amax.reshape(blocks.shape[:-1]), signed.reshape(blocks.shape[:-1])


def block_min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block min and max as C loops with strict comparisons find them: among equal zeros, the first one's sign."""
    columns = block_major(blocks)
    extremes = (columns.min(axis=0).reshape(blocks.shape[:-1]), columns.max(axis=0).reshape(blocks.shape[:-1]))
    return tuple(_first_zero_sign(blocks, value) for value in extremes)  # type: ignore[return-value]


def _first_zero_sign(blocks: np.ndarray, value: np.ndarray) -> np.ndarray:
    is_zero = value == 0
    if is_zero.any():
        first_zero = np.argmax(blocks == 0, axis=-1)
        zero = np.take_along_axis(blocks, first_zero[..., None], axis=-1)[..., 0]
        value = np.where(is_zero, zero, value)
    return value.astype(F32)


def row_sigma2(rows: np.ndarray) -> np.ndarray:
    """Mean of x^2 over each row, summed sequentially (the `sigma2` of the `quantize_row_*_impl` functions)."""
    return seq_sum(rows * rows) / F32(rows.shape[-1])


def importance(blocks: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """llama.cpp's per-value weight `qw * sqrt(sigma2 + x^2)`; `sigma2` is one value per block."""
    return qw * np.sqrt(sigma2[:, None] + blocks * blocks)


def pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """Levels `[n, 32]` to ggml's `qs[16]`: value j in the low nibble, value j+16 in the high one."""
    low = levels[:, :16].astype(np.uint8) & 0x0F
    high = levels[:, 16:].astype(np.uint8) & 0x0F
    return low | (high << 4)


def pack_high_bits(levels: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 levels as the little-endian uint32 `qh` of Q5_0 / Q5_1."""
    bits = (levels.astype(np.uint8) >> 4) & 1
    return np.packbits(bits, axis=-1, bitorder="little")


def chunked(fn: Callable[..., tuple[np.ndarray, ...]], *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Apply `fn` (returning a tuple of per-block arrays) to CHUNK blocks at a time and concatenate."""
    n = arrays[0].shape[0]
    parts = [fn(*(a[i : i + CHUNK] for a in arrays)) for i in range(0, max(n, 1), CHUNK)]
    return tuple(np.concatenate(p, axis=0) for p in zip(*parts, strict=True))


# ----------------------------------------------------------------------------- scale searches


def make_qx_quants(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weighted scale search (llama.cpp `make_qx_quants`, rmse_type 1 with weights).

    Returns `(scale [n], levels [n, 32])` with levels in `[0, 2*nmax)`; all-zero blocks give 0, 0.
    """
    return chunked(lambda x, w: _make_qx_quants(x, w, nmax), blocks, weights)


def _make_qx_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    # it works on [group_size, n_groups], C-contiguous so that its in-order sums take numpy's fast path
    scale, levels = kquants_search.make_qx_quants(np.ascontiguousarray(x.T), nmax, np.ascontiguousarray(w.T))
    return scale, levels.T.astype(np.uint8)


def make_qkx3_quants(blocks: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted scale+min search (llama.cpp `make_qkx3_quants`, rmin -0.9, rdelta 0.05, 36 steps, squared error).

    Returns `(scale, min, levels [n, 32])` where the value is `scale * level + min`.
    """
    return chunked(lambda x, w: _make_qkx3_quants(x, w, nmax), blocks, weights)


def _make_qkx3_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # the K-quant search works on [group_size, n_groups] and returns the negated min
    x_t, w_t = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    scale, negated_min, levels = kquants_search.make_qkx_quants(x_t, w_t, nmax, -0.9, 0.05, 36, use_mad=False)
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
    _, vmax = signed_extreme(blocks)
    d = vmax / F32(-nmax)
    inv = safe_reciprocal(d)
    # x/d lies in [-nmax, nmax], so the argument is positive and the uint8 cast is C's truncation
    levels = (blocks * inv[:, None] + F32(nmax + 0.5)).astype(np.uint8)
    return d, np.minimum(levels, np.uint8(2 * nmax - 1))


def _affine_ref(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_row_q4_1_ref` / `q5_1_ref`: scale (max-min)/nmax, levels trunc((x-min)/d + 0.5)."""
    vmin, vmax = block_min_max(blocks)
    d = (vmax - vmin) / F32(nmax)
    inv = safe_reciprocal(d)
    # (x-min)/d lies in [0, nmax]: a positive argument, truncated by the uint8 cast as C's cast does
    levels = ((blocks - vmin[:, None]) * inv[:, None] + F32(0.5)).astype(np.uint8)
    return d, vmin, np.minimum(levels, np.uint8(nmax))


class Q8_0(_Legacy, qtype=gguf.GGMLQuantizationType.Q8_0):
    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        amax, _ = signed_extreme(blocks)
        d = amax / F32(127)
        scaled = blocks * safe_reciprocal(d)[:, None]
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
        return np.concatenate([fp16_bytes(d), pack_high_bits(levels), pack_nibbles(levels)], axis=1)

    @classmethod
    def weighted_blocks(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        d, levels = make_qx_quants(blocks, weights, 16)
        return np.concatenate([fp16_bytes(d), pack_high_bits(levels), pack_nibbles(levels)], axis=1)


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
        parts = [fp16_bytes(d), fp16_bytes(vmin), pack_high_bits(levels), pack_nibbles(levels)]
        return np.concatenate(parts, axis=1)
