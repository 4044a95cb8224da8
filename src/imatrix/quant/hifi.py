"""Q3_K_HIFI: Q3_K plus a few exact fp16 outliers per 256 weights (our own type, not in ggml).

Each 256-value super-block keeps its N most important values verbatim; importance is
`|x_i| * imatrix_i` (just `|x_i|` without an imatrix). The rest of the block, with those positions set
to zero (and, with an imatrix, their weights set to zero too, since their reconstruction is discarded),
is quantized as an ordinary Q3_K block by llama.cpp's algorithm. Dequantization is Q3_K's, then the
outlier positions are overwritten with their fp16 values.

Block layout, `type_size = 110 + 3 * N` bytes (134 for the default N = 8), little endian:

    bytes [0, 110)            the Q3_K block (hmask[32] qs[64] scales[12] d), ggml's layout
    bytes [110, 110 + N)      uint8 positions of the outliers within the block, ascending
    bytes [110 + N, 110 + 3N) their values as fp16, same order

N = 8 (3% of the weights) costs 0.75 bits per weight, 4.19 bpw in all: still below Q4_K's 4.5, and
enough to take the handful of extreme values that dominate Q3_K's error on `ffn_down` tensors out of
the scale search, which then fits the remaining values with a finer step.

The type id (`HIFI_TYPE_ID`) lies far outside ggml's `ggml_type` range, so a file carrying it can
never be mistaken for a llama.cpp type; neither gguf-py nor llama.cpp can read it.
"""

from __future__ import annotations

import enum

import gguf
import numpy as np

from imatrix.quant.base import QuantType
from imatrix.quant.kquants import Q3_K

N_OUTLIERS = 8
Q3_K_SIZE = 110
FP16_MAX = float(np.finfo(np.float16).max)


class ExtraQuantType(enum.IntEnum):
    """Quantization types of this project that ggml does not know."""

    Q3_K_HIFI = 1000


HIFI_TYPE_ID = ExtraQuantType.Q3_K_HIFI


class Q3_K_HIFI(QuantType):
    """Q3_K with `n_outliers` fp16 outliers per super-block (layout in the module docstring)."""

    n_outliers = N_OUTLIERS

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        blocks = np.asarray(blocks, dtype=np.float32)
        importance = np.abs(blocks) if weights is None else np.abs(blocks) * weights
        idx = outlier_positions(importance, cls.n_outliers)
        rest = blocks.copy()
        np.put_along_axis(rest, idx, np.float32(0), axis=1)
        rest_weights = None
        if weights is not None:
            rest_weights = np.array(weights, dtype=np.float32)
            np.put_along_axis(rest_weights, idx, np.float32(0), axis=1)
        values = np.clip(np.take_along_axis(blocks, idx, axis=1), -FP16_MAX, FP16_MAX).astype(np.float16)
        return np.concatenate(
            [Q3_K.quantize_blocks(rest, rest_weights), idx.astype(np.uint8), values.view(np.uint8)], axis=1
        )

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        """Bytes `[..., k * type_size]` to float32 `[..., k * 256]`."""
        data = np.asarray(data, dtype=np.uint8)
        lead = data.shape[:-1]
        raw = data.reshape(-1, cls.type_size)
        n = cls.n_outliers
        out = gguf.quants.dequantize(np.ascontiguousarray(raw[:, :Q3_K_SIZE]), gguf.GGMLQuantizationType.Q3_K)
        out = np.array(out, dtype=np.float32).reshape(-1, cls.block_size)
        idx = raw[:, Q3_K_SIZE : Q3_K_SIZE + n].astype(np.intp)
        values = np.ascontiguousarray(raw[:, Q3_K_SIZE + n :]).view(np.float16).astype(np.float32)
        np.put_along_axis(out, idx, values, axis=1)
        return out.reshape(*lead, -1)


def outlier_positions(importance: np.ndarray, n: int) -> np.ndarray:
    """Per block, the `n` positions of largest importance (earlier position wins a tie), ascending."""
    order = np.argsort(-importance, axis=1, kind="stable")[:, :n]
    return np.sort(order, axis=1)


def dequantize_q3_k_hifi(data: np.ndarray) -> np.ndarray:
    """Q3_K_HIFI bytes `[..., k * type_size]` to float32 `[..., k * 256]`."""
    return Q3_K_HIFI.dequantize(data)


Q3_K_HIFI.register_extra(HIFI_TYPE_ID, 256, Q3_K_SIZE + 3 * N_OUTLIERS)
