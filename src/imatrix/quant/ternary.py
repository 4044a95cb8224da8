"""Ternary types TQ1_0 and TQ2_0 (256-value blocks, levels -1, 0, +1 times the block's largest |x|),
bit-compatible with llama.cpp's `quantize_row_tq1_0_ref` / `quantize_row_tq2_0_ref`.

Both read no imatrix (`quantize_tq1_0` / `quantize_tq2_0` ignore it). A value's level is C's
`lroundf(x * (1/d))` (halves away from zero); TQ1_0 packs five levels per byte in base 3, TQ2_0 four
per byte in 2 bits.

Implementation-defined in C: a block whose largest |x| is below 2**-128 (float32 subnormals only; never
in F16/BF16 input) has an infinite 1/d, and glibc's `lroundf` of the non-finite products returns
LONG_MIN, whose `+ 1` truncated to int is 1: those values get level 0, as here.
"""

from __future__ import annotations

import gguf
import numpy as np

from imatrix.quant.base import QuantType
from imatrix.quant.blocks import F32, absmax_blocks, fp16_bytes, reciprocal_where_nonzero, unit_round_half_away

# base-3 digit weights, the first value the most significant (C builds each byte as q = 3*q + level)
_POW3_5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)
_POW3_4 = np.array([27, 9, 3, 1], dtype=np.uint16)


def ternary_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block the scale `d` (largest |x|) and each value's code `lroundf(x * (1/d)) + 1` in 0..2 (uint8)."""
    x = np.asarray(blocks, dtype=F32)
    d = absmax_blocks(x)
    with np.errstate(over="ignore", invalid="ignore"):
        inverse = reciprocal_where_nonzero(d)
        codes = (unit_round_half_away(x * inverse[:, None]) + np.int8(1)).view(np.uint8)
    overflowed = ~np.isfinite(inverse)
    if overflowed.any():
        codes[overflowed] = 1
    return d, codes


def _base3_bytes(digits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Digits `[n, k, m]` (0..2) to m bytes: the base-3 number over k scaled to 0..255 by ceil(q * 256 / 243),
    so that the dequantizer reads digit i back as the top base-3 digit of (byte * 3**i) mod 256."""
    q = (digits.astype(np.uint16) * weights[:, None]).sum(axis=1, dtype=np.uint16)
    return ((q * 256 + 242) // 243).astype(np.uint8)


class TQ1_0(QuantType, qtype=gguf.GGMLQuantizationType.TQ1_0):
    """Block: qs[48] qh[4] d. qs[m] (m < 32) holds values m + 32n, qs[32 + m] (m < 16) values 160 + m + 16n
    (n = 0..4, first most significant); qh[j] holds values 240 + j + 4n (n = 0..3) and a zero digit."""

    reads_imatrix = False

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        d, codes = ternary_codes(blocks)
        n = codes.shape[0]
        qs_32 = _base3_bytes(codes[:, :160].reshape(n, 5, 32), _POW3_5)
        qs_16 = _base3_bytes(codes[:, 160:240].reshape(n, 5, 16), _POW3_5)
        qh = _base3_bytes(codes[:, 240:].reshape(n, 4, 4), _POW3_4 * 3)  # shifted up one digit, as C's q *= 3
        return np.concatenate([qs_32, qs_16, qh, fp16_bytes(d)], axis=1)


class TQ2_0(QuantType, qtype=gguf.GGMLQuantizationType.TQ2_0):
    """Block: qs[64] d. Per 128 values h, byte 32h + m holds value 128h + m + 32n at bits 2n (n = 0..3)."""

    reads_imatrix = False

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        d, codes = ternary_codes(blocks)
        c = codes.reshape(-1, 2, 4, 32)
        qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
        return np.concatenate([qs.reshape(-1, 64), fp16_bytes(d)], axis=1)
