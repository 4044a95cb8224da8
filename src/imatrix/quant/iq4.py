"""Non-linear 4-bit types IQ4_NL (32-value blocks) and IQ4_XS (256-value super-blocks), bit-compatible
with llama.cpp's `quantize_row_iq4_nl_impl`.

Each 32-value block gets a scale from a weighted search over 15 candidate scales, every value
snapping to the nearest of 16 fixed levels. IQ4_XS then re-expresses its eight block scales as
6-bit multiples of one fp16 super-block scale. `sigma2` comes from the (super-)block itself, not
the row, so the default row driver of `QuantType` suffices.
"""

from __future__ import annotations

import gguf
import numpy as np

from imatrix.quant.base import QuantType
from imatrix.quant.blocks import (
    F32,
    GROUP_MAX_EPS,
    divide_where,
    fp16_bytes,
    in_steps,
    pack_nibbles,
    reciprocal_where_nonzero,
    signed_absmax_blocks,
    sum_blocks,
)

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_LEVELS = KVALUES.astype(F32)
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs both search itry in [-7, 7]


# llama.cpp's best_index_int8 takes the nearer of the two levels around x, the upper one on a tie. With
# integer levels and |x| < 128 both differences it compares are exact in float32, so its choice is the
# number of midpoints between levels that are <= x. The midpoints are multiples of 1/2, hence that
# number is constant on every [k/2, (k+1)/2) and one table indexed by floor(2x) holds it.
_MIDPOINTS = (_LEVELS[:-1] + _LEVELS[1:]) / F32(2)
_HALF_STEP_MIN, _HALF_STEP_MAX = -256, 256  # floor(2x) for x in [-128, 128]; beyond, the end levels
_INDEX_BY_HALF_STEP = np.searchsorted(
    _MIDPOINTS, np.arange(_HALF_STEP_MIN, _HALF_STEP_MAX + 1, dtype=F32) / F32(2), side="right"
).astype(np.uint8)


def best_index(scaled: np.ndarray) -> np.ndarray:
    """Index of the nearest level (llama.cpp `best_index_int8`: a tie goes to the upper level)."""
    half_steps = np.floor(np.asarray(scaled, dtype=F32) * F32(2))
    np.clip(half_steps, _HALF_STEP_MIN, _HALF_STEP_MAX, out=half_steps)
    return _INDEX_BY_HALF_STEP[half_steps.astype(np.intp) - _HALF_STEP_MIN]


def value_weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Per-value weights of one super-block row `x [n, super]`: `qw*sqrt(sigma2 + x^2)`, or `x^2` without imatrix.

    Here `sigma2` is twice the mean x^2 of the super-block (quantize_row_iq4_nl_impl).
    """
    if qw is None:
        return x * x
    sigma2 = sum_blocks(x * x) * F32(2.0 / x.shape[-1])
    return qw * np.sqrt(sigma2[:, None] + x * x)


def block_scales(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Best weighted scale of each 32-value block (0 for an all-zero block)."""
    # the search holds every candidate scale's levels at once: 2 * NTRY + 2 copies of the blocks
    return in_steps(_block_scales, blocks, weights, copies=2 * NTRY + 2)[0]


def _block_scales(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray]:
    amax, vmax = signed_absmax_blocks(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    # candidate 0: d = -max/values[0]; then inverse scales (itry + values[0]) / max
    first = F32(1) / (-vmax / _LEVELS[0])
    tries = np.arange(-NTRY, NTRY + 1, dtype=F32) + _LEVELS[0]
    inv = np.concatenate([first[:, None], tries[None, :] / vmax[:, None]], axis=1)
    q = _LEVELS[best_index(inv[:, :, None] * x[:, None, :])]
    wq = w[:, None, :] * q
    sumqx = sum_blocks(wq * x[:, None, :])
    sumq2 = sum_blocks(wq * q)
    d = divide_where(sumqx[:, 0], sumq2[:, 0], sumq2[:, 0] > 0)
    best = d * sumqx[:, 0]
    for k in range(1, inv.shape[1]):
        better = (sumq2[:, k] > 0) & (sumqx[:, k] * sumqx[:, k] > best * sumq2[:, k])
        d = np.where(better, divide_where(sumqx[:, k], sumq2[:, k], better), d)
        best = np.where(better, d * sumqx[:, k], best)
    return (np.where(zero, F32(0), d).astype(F32),)


class IQ4_NL(QuantType, qtype=gguf.GGMLQuantizationType.IQ4_NL):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        x = np.asarray(blocks, dtype=F32)
        qw = None if weights is None else np.asarray(weights, dtype=F32)
        d = block_scales(x, value_weights(x, qw))
        levels = best_index(x * reciprocal_where_nonzero(d)[:, None])
        return np.concatenate([fp16_bytes(d), pack_nibbles(levels)], axis=1)


class IQ4_XS(QuantType, qtype=gguf.GGMLQuantizationType.IQ4_XS):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        x = np.asarray(blocks, dtype=F32)
        n = x.shape[0]
        qw = None if weights is None else np.asarray(weights, dtype=F32)
        sub = x.reshape(-1, 32)
        scales = block_scales(sub, value_weights(x, qw).reshape(-1, 32)).reshape(n, 8)
        d, codes = cls._super_scale(scales)
        block_d = (d[:, None] * codes.astype(F32)).reshape(-1)
        levels = best_index(sub * reciprocal_where_nonzero(block_d)[:, None])
        parts = [fp16_bytes(d), cls._pack_scales(codes + 32), pack_nibbles(levels).reshape(n, -1)]
        return np.concatenate(parts, axis=1)

    @staticmethod
    def _super_scale(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Super-block scale `-max_scale/32` and the 6-bit signed code of each block scale in [-32, 31]."""
        _, max_scale = signed_absmax_blocks(scales)
        d = -max_scale / F32(32)
        codes = np.clip(np.rint(reciprocal_where_nonzero(d)[:, None] * scales), -32, 31).astype(np.int8)
        return d, codes

    @staticmethod
    def _pack_scales(codes: np.ndarray) -> np.ndarray:
        """Eight 6-bit codes to `scales_h` (uint16, 2 high bits each) and `scales_l[4]` (low nibbles)."""
        codes = codes.astype(np.uint16)
        high = ((codes >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
        low = (codes & 0x0F).astype(np.uint8)
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
        return np.concatenate([high.astype("<u2").view(np.uint8).reshape(-1, 2), scales_l], axis=1)
