"""K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-value super-blocks), bit-compatible with llama.cpp.

Without an imatrix llama.cpp runs each type's `quantize_row_qX_K_ref`; with one, its
`quantize_row_qX_K_impl`, whose per-value weights are `imatrix * sqrt(sigma2 + x^2)` with `sigma2`
the super-block's mean x^2 (times 2 for Q3_K..Q5_K), except Q6_K, which uses the bare imatrix.
Everything here is per super-block, so the default row-to-block tiling of `QuantType.quantize` is
enough. The searches live in `searches.py` and take the groups layout of `blocks.py` (`to_groups`:
sub-blocks as columns); this module builds weights, picks the super-block scales, requantizes with
the fp16-rounded scales, and packs ggml's block layouts.
"""

from __future__ import annotations

import gguf
import numpy as np

from imatrix.quant.base import QuantType
from imatrix.quant.blocks import (
    F32,
    GROUP_MAX_EPS,
    fp16_scale,
    from_groups,
    max_positive_blocks,
    nearest,
    pack_bits,
    signed_absmax_groups,
    steps,
    sum_groups,
    to_groups,
    to_uint8,
)
from imatrix.quant.searches import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants

QK_K = 256
Q = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- layout helpers


def block_sigma2(blocks: np.ndarray, factor: float) -> np.ndarray:
    """`factor * sum(x^2) / 256` per super-block, summed in order as the `_impl` kernels do."""
    return F32(factor) * sum_groups(to_groups(blocks * blocks, QK_K)) / F32(QK_K)


def imatrix_weights(blocks: np.ndarray, qw: np.ndarray, factor: float) -> np.ndarray:
    """The `_impl` kernels' per-value weights `qw * sqrt(sigma2 + x^2)`."""
    sigma2 = block_sigma2(blocks, factor)[:, None]
    return qw * np.sqrt(sigma2 + blocks * blocks)


def requantize(x: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Final levels from the stored (fp16-rounded, integer-scaled) sub-block scales.

    `x`, `levels`: value-major `[size, groups]`; `d`, `dm`: per group. Groups whose scale is zero keep
    the search's levels, as the C kernels `continue` past them.
    """
    ok = d != 0
    shifted = x if dm is None else x + dm
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(nearest(shifted / np.where(ok, d, F32(1))), lo, hi)
    return np.where(ok, new, levels)


def pack_2bit(levels: np.ndarray) -> np.ndarray:
    """Levels `[n, 256]` (0..3) to `qs[64]`: byte 32h+l holds values 128h+l+32k at bits 2k."""
    lv = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    out = lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)
    return out.reshape(-1, 64)


def pack_4bit(levels: np.ndarray) -> np.ndarray:
    """Levels `[n, 256]` to Q4_K/Q5_K `qs[128]`: byte 32c+l holds value 64c+l low, 64c+32+l high."""
    lv = (levels.astype(np.uint8) & 0x0F).reshape(-1, 4, 2, 32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins `[n, 8]` into the 12 bytes `get_scale_min_k4` reads."""
    ls = ls.astype(np.uint8) & 63
    lm = lm.astype(np.uint8) & 63
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def pack_scales_q3(ls: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit Q3_K scales `[n, 16]` (stored +32) into 12 bytes: low nibbles, then 2-bit tops."""
    ls = ls.astype(np.uint8) & 63
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)
    top = (ls >> 4).reshape(-1, 4, 4)  # [n, j // 4, j % 4]
    out[:, 8:12] = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return out


# ----------------------------------------------------------------------------- types


class _KQuant(QuantType):
    """Common driver: the `_ref` kernel without imatrix, the `_impl` one with it, in chunks."""

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        blocks = np.asarray(blocks, dtype=F32)
        out = np.empty((blocks.shape[0], cls.type_size), dtype=np.uint8)
        for part in steps(blocks.shape[0], QK_K):
            if weights is None:
                out[part] = cls.ref_blocks(blocks[part])
            else:
                out[part] = cls.impl_blocks(blocks[part], np.asarray(weights[part], dtype=F32))
        return out

    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def impl_blocks(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Q2_K(_KQuant, qtype=Q.Q2_K):
    """16 sub-blocks of 16, 2-bit levels, 4-bit scales and mins. Block: scales[16] qs[64] d dmin."""

    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        x = to_groups(blocks, 16)
        scales, mins, levels = make_qkx_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = from_groups(scales, n), from_groups(mins, n)
        max_scale, max_min = max_positive_blocks(scales), max_positive_blocks(mins)
        # quantize_row_q2_K_ref: scales and mins relative to their own maxima over 15
        has_scale, has_min = (max_scale > 0)[:, None], (max_min > 0)[:, None]
        inv_scale = np.where(has_scale, F32(15) / np.where(has_scale, max_scale[:, None], F32(1)), F32(0))
        inv_min = np.where(has_min, F32(15) / np.where(has_min, max_min[:, None], F32(1)), F32(0))
        ls = np.where(has_scale, nearest(inv_scale * scales), F32(0))
        lm = np.where(has_min, nearest(inv_min * mins), F32(0))
        packed = to_uint8(ls) | (to_uint8(lm) << 4)
        d_bytes, d = fp16_scale(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
        m_bytes, dmin = fp16_scale(np.where(max_min > 0, max_min / F32(15), F32(0)))
        return cls.finish(blocks, x, levels, packed, d, dmin, d_bytes, m_bytes)

    @classmethod
    def impl_blocks(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        w = to_groups(imatrix_weights(blocks, qw, 1.0), 16)
        x = to_groups(blocks, 16)
        scales, mins, levels = make_qkx_quants(x, w, 3, -0.9, 0.05, 36, use_mad=False)
        sw = from_groups(sum_groups(w), n).T
        d_block, ls = make_qp_quants(np.ascontiguousarray(from_groups(scales, n).T), 15, sw)
        m_block, lm = make_qp_quants(np.ascontiguousarray(from_groups(mins, n).T), 15, sw)
        packed = to_uint8(ls.T) | (to_uint8(lm.T) << 4)
        d_bytes, d = fp16_scale(d_block)
        m_bytes, dmin = fp16_scale(m_block)
        return cls.finish(blocks, x, levels, packed, d, dmin, d_bytes, m_bytes)

    @staticmethod
    def finish(
        blocks: np.ndarray,
        x: np.ndarray,
        levels: np.ndarray,
        packed: np.ndarray,
        d: np.ndarray,
        dmin: np.ndarray,
        d_bytes: np.ndarray,
        m_bytes: np.ndarray,
    ) -> np.ndarray:
        sub_d = (d[:, None] * (packed & 0x0F).astype(F32)).reshape(-1)
        sub_m = (dmin[:, None] * (packed >> 4).astype(F32)).reshape(-1)
        final = from_groups(requantize(x, levels, sub_d, sub_m, 0, 3), blocks.shape[0])
        return np.concatenate([packed, pack_2bit(final), d_bytes, m_bytes], axis=1)


class Q3_K(_KQuant, qtype=Q.Q3_K):
    """16 sub-blocks of 16, 3-bit symmetric levels, 6-bit scales. Block: hmask[32] qs[64] scales[12] d."""

    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        x = to_groups(blocks, 16)
        scales, levels = make_q3_quants(x, 4)
        scales = from_groups(scales, n)
        _, max_scale = signed_absmax_groups(np.ascontiguousarray(scales.T))
        has = (max_scale != 0)[:, None]
        # quantize_row_q3_K_ref: scales relative to the signed largest one, over -32
        iscale = np.where(has, F32(-32) / np.where(has, max_scale[:, None], F32(1)), F32(0))
        ls = np.where(has, np.clip(nearest(iscale * scales), -32, 31) + F32(32), F32(0))
        d_val = np.where(has[:, 0], F32(1) / np.where(has[:, 0], iscale[:, 0], F32(1)), F32(0))
        return cls.finish(blocks, x, levels, ls, d_val)

    @classmethod
    def impl_blocks(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        w = to_groups(imatrix_weights(blocks, qw, 2.0), 16)
        x = to_groups(blocks, 16)
        scales, levels = make_qx_quants(x, 4, w)
        sw = np.ascontiguousarray(from_groups(sum_groups(w), n).T)
        d_block, ls = make_qx_quants(np.ascontiguousarray(from_groups(scales, n).T), 32, sw)
        return cls.finish(blocks, x, levels, ls.T, d_block)

    @staticmethod
    def finish(blocks: np.ndarray, x: np.ndarray, levels: np.ndarray, ls: np.ndarray, d_val: np.ndarray) -> np.ndarray:
        """Requantize with the stored scales `d * (ls - 32)` and pack; `levels` are the search's, 0..7."""
        d_bytes, d = fp16_scale(d_val)
        sub_d = (d[:, None] * (ls.astype(F32) - F32(32))).reshape(-1)
        final = requantize(x, levels - F32(4), sub_d, None, -4, 3) + F32(4)
        final = from_groups(final, blocks.shape[0]).astype(np.uint8)
        hmask = pack_bits((final > 3).reshape(-1, 8, 32))
        return np.concatenate([hmask, pack_2bit(final & 3), pack_scales_q3(ls), d_bytes], axis=1)


class _Q4_5_K(_KQuant):
    """Q4_K / Q5_K: 8 sub-blocks of 32, affine levels, 6-bit scales and mins packed k4-style."""

    nmax: int
    ref_search: tuple[float, float, int]

    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        x = to_groups(blocks, 32)
        av_x = np.sqrt(sum_groups(x * x) / F32(32))
        scales, mins, levels = make_qkx_quants(x, av_x + np.abs(x), cls.nmax, *cls.ref_search, use_mad=False)
        scales, mins = from_groups(scales, n), from_groups(mins, n)
        max_scale, max_min = max_positive_blocks(scales), max_positive_blocks(mins)
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(to_uint8(nearest(inv_scale[:, None] * scales)), 63)
        lm = np.minimum(to_uint8(nearest(inv_min[:, None] * mins)), 63)
        return cls.finish(blocks, x, levels, ls, lm, max_scale / F32(63), max_min / F32(63))

    @classmethod
    def impl_blocks(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        w = to_groups(imatrix_weights(blocks, qw, 2.0), 32)
        x = to_groups(blocks, 32)
        scales, mins, levels = make_qkx_quants(x, w, cls.nmax, -0.9, 0.05, 36, use_mad=False)
        sw = np.ascontiguousarray(from_groups(sum_groups(w), n).T)
        d_block, ls = make_qp_quants(np.ascontiguousarray(from_groups(scales, n).T), 63, sw)
        m_block, lm = make_qp_quants(np.ascontiguousarray(from_groups(mins, n).T), 63, sw)
        return cls.finish(blocks, x, levels, to_uint8(ls.T), to_uint8(lm.T), d_block, m_block)

    @classmethod
    def finish(
        cls,
        blocks: np.ndarray,
        x: np.ndarray,
        levels: np.ndarray,
        ls: np.ndarray,
        lm: np.ndarray,
        d_val: np.ndarray,
        m_val: np.ndarray,
    ) -> np.ndarray:
        d_bytes, d = fp16_scale(d_val)
        m_bytes, dmin = fp16_scale(m_val)
        scales = pack_scales_k4(ls, lm)
        sub_d = (d[:, None] * (ls & 63).astype(F32)).reshape(-1)
        sub_m = (dmin[:, None] * (lm & 63).astype(F32)).reshape(-1)
        final = from_groups(requantize(x, levels, sub_d, sub_m, 0, cls.nmax), blocks.shape[0])
        parts = [d_bytes, m_bytes, scales]
        if cls.nmax == 31:
            parts.append(pack_bits((final > 15).reshape(-1, 8, 32)))
        parts.append(pack_4bit(final))
        return np.concatenate(parts, axis=1)


class Q4_K(_Q4_5_K, qtype=Q.Q4_K):
    """Block: d dmin scales[12] qs[128]."""

    nmax = 15
    ref_search = (-1.0, 0.1, 20)


class Q5_K(_Q4_5_K, qtype=Q.Q5_K):
    """Block: d dmin scales[12] qh[32] qs[128]; qh bit k of byte l is bit 4 of value 32k+l."""

    nmax = 31
    ref_search = (-0.5, 0.1, 15)


class Q6_K(_KQuant, qtype=Q.Q6_K):
    """16 sub-blocks of 16, 6-bit symmetric levels, int8 scales. Block: ql[128] qh[64] scales[16] d."""

    @classmethod
    def ref_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        x = to_groups(blocks, 16)
        return cls.finish(blocks, x, *make_qx_quants(x, 32, x * x))

    @classmethod
    def impl_blocks(cls, blocks: np.ndarray, qw: np.ndarray) -> np.ndarray:
        # quantize_row_q6_K_impl weights by the bare imatrix (its sigma2 weighting is commented out)
        x = to_groups(blocks, 16)
        return cls.finish(blocks, x, *make_qx_quants(x, 32, to_groups(qw, 16)))

    @staticmethod
    def finish(blocks: np.ndarray, x: np.ndarray, scales: np.ndarray, levels: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        amax, max_scale = signed_absmax_groups(np.ascontiguousarray(from_groups(scales, n).T))
        empty = amax < GROUP_MAX_EPS
        iscale = F32(-128) / np.where(empty, F32(1), max_scale)
        d_bytes, d = fp16_scale(np.where(empty, F32(0), F32(1) / iscale))
        sc = np.minimum(nearest(iscale[:, None] * from_groups(scales, n)), F32(127))
        sc = np.where(empty[:, None], F32(0), sc)
        sub_d = (d[:, None] * sc).reshape(-1)
        final = requantize(x, levels - F32(32), sub_d, None, -32, 31) + F32(32)
        final = np.where(empty[:, None], 0, from_groups(final, n)).astype(np.uint8)
        return np.concatenate([pack_6bit(final), sc.astype(np.int8).view(np.uint8), d_bytes], axis=1)


def pack_6bit(levels: np.ndarray) -> np.ndarray:
    """Q6_K levels `[n, 256]` (0..63) to `ql[128] qh[64]`.

    Per half h and l < 32 (value v_k = 128h + 32k + l): ql[64h + l] holds v_0 low, v_2 high nibble;
    ql[64h + 32 + l] holds v_1 and v_3; qh[32h + l] holds the top 2 bits of v_k at bits 2k.
    """
    lv = levels.reshape(-1, 2, 4, 32)
    lo = lv & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = lv >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64)], axis=1)
