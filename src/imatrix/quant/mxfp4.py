"""MXFP4 (32-value blocks of 4-bit e2m1 floats under one power-of-two scale), bit-compatible with
llama.cpp's `quantize_row_mxfp4_ref`; the MXFP4_MOE file type stores MoE expert tensors in it.

The scale's exponent byte is `floor(log2(amax)) - 2 + 127` (0 for an all-zero block), its value
`d = 2**(e - 128)` (ggml's E8M0 "half" convention: the levels are twice the e2m1 values,
0 1 2 3 4 6 8 12). Each value takes the level whose `|level * d - x|`, rounded to float32 as C
computes it, is smallest, the earlier index on a tie; the imatrix is not read (`quantize_mxfp4`
ignores it).

The C search compares all 16 levels. A level of the opposite sign never beats index 0 (level 0,
error |x|), and the two magnitudes around |x| are within a factor 2 of it, so both their errors are
exact in float32 (Sterbenz) while any other level's is larger by at least d. C's choice is therefore
the exact nearest magnitude, the lower one at a midpoint: a threshold on |x| / d (exact, d being a
power of two) against the midpoints 0.5 1.5 2.5 3.5 5 7 10, read from a table by ceil(2 |x| / d).

Implementation-defined in C (neither occurs with F16 or BF16 input, whose block maxima lie at least
2**-11 relative below a power of two, or on one): C's `log2f` result is floored, so for a float32
block max a few ulps below a power of two the exponent depends on the libm's rounding; here it is
the correctly rounded log2 (float64, rounded to float32), which glibc's `log2f` gave for all of the
64 floats at and below each power of two 2**-124 .. 2**127 (the exact floor differs for 7316 of
those 16128). A block max below 2**-125 makes the exponent negative, and C converts that float to
uint8 out of range; here as x86 does (via int32, keeping the low byte). llama-quantize then refuses
to write an exponent byte of 255 (its row validation reads it as NaN); this module writes it.
"""

from __future__ import annotations

import gguf
import numpy as np

from imatrix.quant.base import QuantType
from imatrix.quant.blocks import F32, absmax_blocks, pack_nibbles

# kvalues_mxfp4's magnitudes (indices 0..7; indices 8..15 are the same, negated)
MAGNITUDES = np.array([0, 1, 2, 3, 4, 6, 8, 12], dtype=F32)
# index of the nearest magnitude (the lower one at a midpoint) for |x| / d in ((c - 1) / 2, c / 2], by c:
# the midpoints are multiples of 1/2, so the number of them below |x| / d is constant there
_MIDPOINTS = (MAGNITUDES[:-1] + MAGNITUDES[1:]) / F32(2)
_INDEX_BY_HALF_STEPS = np.searchsorted(_MIDPOINTS, np.arange(33, dtype=F32) / F32(2), side="left").astype(np.uint8)


def shared_exponent(amax: np.ndarray) -> np.ndarray:
    """The E8M0 byte of each block: `floor(log2f(amax)) - 2 + 127`, 0 where amax is 0."""
    positive = amax > 0
    with np.errstate(divide="ignore"):
        log2 = np.log2(amax.astype(np.float64)).astype(F32)  # log2f, correctly rounded
    exponent = np.where(positive, np.floor(log2), F32(0)) + F32(125)
    return np.where(positive, exponent.astype(np.int32) & 0xFF, 0).astype(np.uint8)


def half_scale(exponent: np.ndarray) -> np.ndarray:
    """ggml's `GGML_E8M0_TO_FP32_HALF`: 2**(e - 128) as float32 (subnormal for e < 2)."""
    return np.ldexp(F32(1), exponent.astype(np.int32) - 128).astype(F32)


def level_indices(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """`best_index_mxfp4` for values `x [n, k]` under scales `d [n]`: indices 0..15 (uint8)."""
    # |x| / (d/2) is exact (a power of two, 2**-129 at the least) and below 32
    half_steps = np.ceil(np.abs(x) / (d * F32(0.5))[:, None])
    index = _INDEX_BY_HALF_STEPS[np.minimum(half_steps, F32(32)).astype(np.uint8)]
    return index + ((x < 0) & (index > 0)).view(np.uint8) * np.uint8(8)


class MXFP4(QuantType, qtype=gguf.GGMLQuantizationType.MXFP4):
    """Block: e qs[16]; qs[j] holds value j in the low nibble, value j + 16 in the high one."""

    reads_imatrix = False

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        x = np.asarray(blocks, dtype=F32)
        exponent = shared_exponent(absmax_blocks(x))
        indices = level_indices(x, half_scale(exponent))
        return np.concatenate([exponent[:, None], pack_nibbles(indices)], axis=1)
