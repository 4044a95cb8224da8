"""Q1_0 (128-value blocks, one sign bit per value) and Q2_0 (64-value blocks, 2-bit levels -1..2),
bit-compatible with llama.cpp's `quantize_row_q1_0_ref` / `quantize_row_q2_0_ref`.

Neither reads the imatrix: `quantize_q1_0` / `quantize_q2_0` run the same reference kernel with or
without one. gguf-py cannot dequantize either type yet, so both classes bring their own `dequantize`.

Implementation-defined in C: a Q2_0 block whose largest |x| is below 2**-128 (float32 subnormals only;
never in F16/BF16 input) converts non-finite floats to int; read here as x86 does.
"""

from __future__ import annotations

import numpy as np

from imatrix.quant.base import QuantType, ggml_type
from imatrix.quant.blocks import (
    F32,
    absmax_blocks,
    fp16_bytes,
    reciprocal_where_nonzero,
    sum_groups,
    to_groups,
    unit_round_half_away,
)


def _split_scale(data: np.ndarray, type_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes `[..., k * type_size]` of blocks `d (fp16), qs[...]` to (`d [m, 1]` float32, `qs [m, type_size - 2]`)."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, type_size)
    d = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(F32)
    return d, blocks[:, 2:]


class Q1_0(QuantType, qtype=ggml_type("Q1_0")):
    """Block: d qs[16]. d is the block's mean |x|; bit j (of byte j / 8) says x_j >= 0, i.e. +d, else -d."""

    reads_imatrix = False

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        x = np.asarray(blocks, dtype=F32)
        mean_abs = sum_groups(np.abs(to_groups(x, cls.block_size))) / F32(cls.block_size)
        signs = np.packbits(x >= 0, axis=-1, bitorder="little")  # -0.0 >= 0 holds: a zero of either sign is +d
        return np.concatenate([fp16_bytes(mean_abs), signs], axis=1)

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        d, qs = _split_scale(data, cls.type_size)
        positive = np.unpackbits(qs, axis=-1, bitorder="little").astype(bool)
        values = np.where(positive, d, -d)
        return values.reshape(*np.shape(data)[:-1], -1)


class Q2_0(QuantType, qtype=ggml_type("Q2_0")):
    """Block: d qs[16]. d is the block's largest |x|; value j is 2 bits at bit 2*(j % 4) of byte j / 4,
    stored as roundf(x * (1/d)) + 1 for the levels -1, 0, 1, 2 (C never picks level 2: |x| <= d)."""

    reads_imatrix = False

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        x = np.asarray(blocks, dtype=F32)
        d = absmax_blocks(x)
        with np.errstate(over="ignore", invalid="ignore"):
            inverse = reciprocal_where_nonzero(d)
            codes = (unit_round_half_away(x * inverse[:, None]) + np.int8(1)).view(np.uint8)
        # below 2**-128 the reciprocal of d overflows: C's int conversion of the non-finite products
        # gives INT_MIN on x86, which the clamp makes code 0
        codes[~np.isfinite(inverse)] = 0
        codes = codes.reshape(x.shape[0], -1, 4)
        packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
        return np.concatenate([fp16_bytes(d), packed], axis=1)

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        d, qs = _split_scale(data, cls.type_size)
        codes = (qs[:, :, None] >> np.arange(0, 8, 2, dtype=np.uint8)) & 3
        with np.errstate(invalid="ignore"):  # an infinite fp16 scale times level 0 is NaN, in C too
            values = (codes.reshape(qs.shape[0], -1).astype(F32) - F32(1)) * d
        return values.reshape(*np.shape(data)[:-1], -1)
