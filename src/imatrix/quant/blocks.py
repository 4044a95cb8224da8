"""Block operations every quantization kernel shares, bit-compatible with ggml-quants.c.

Two array layouts; a function's name says which one it takes:

* **blocks** `[n_blocks, block_size]`: one block per row. `QuantType.quantize_blocks` receives this, the
  packers return it, and `..._blocks` functions reduce over its last axis.
* **groups** `[group_size, n_groups]`: value-major, one (sub-)block per column. The scale searches
  (`searches.py`) work on it: C's loop over the values of a block becomes a short Python loop over the
  leading axis, each step one vector operation across every group. `..._groups` functions reduce over
  its first axis; `to_groups` / `from_groups` convert.

Functions without a layout in their name (`fp16_bytes`, `divide_where`, `nearest`, ...) are elementwise.

Bit-exactness: ggml-quants.c is plain float32 arithmetic in source order (built without FMA contraction
or fast-math), so kernels keep C's operand order (`w * x * l` is `(w * x) * l`) and add sequentially:
numpy's own `sum` adds pairwise and rounds differently, hence `sum_blocks` / `sum_groups`.

Adding a type (see also `base.py`): subclass `QuantType` with `qtype=...` in a module of its family,
build it from these operations and the searches, import the module in `quant/__init__.py`, and give
`mixes.py` its file type, fallback and imatrix rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

F32 = np.float32
# ggml-quants.c's GROUP_MAX_EPS: a block whose largest |x| is below it is stored as zeros
GROUP_MAX_EPS = F32(1e-15)
# Input values per vectorized step of a kernel: bounds its temporaries to a few MiB each.
STEP_VALUES = 1 << 18


# ----------------------------------------------------------------------------- steps


def steps(n_blocks: int, block_size: int, copies: int = 1) -> Iterator[slice]:
    """Slices of at most `STEP_VALUES / (block_size * copies)` blocks covering `n_blocks` (at least one
    slice, so an empty input still yields its empty result). `copies`: how many values a kernel's
    largest temporaries hold per input value (e.g. one per candidate scale it tries at once)."""
    per_step = max(1, STEP_VALUES // (block_size * copies))
    for start in range(0, max(n_blocks, 1), per_step):
        yield slice(start, start + per_step)


def in_steps(fn: Callable[..., tuple[np.ndarray, ...]], *blocks: np.ndarray, copies: int = 1) -> tuple[np.ndarray, ...]:
    """Apply `fn` (arrays of blocks -> tuple of per-block arrays) a step at a time and concatenate."""
    n_blocks, block_size = blocks[0].shape[0], blocks[0].shape[-1]
    parts = [fn(*(a[part] for a in blocks)) for part in steps(n_blocks, block_size, copies)]
    return tuple(np.concatenate(p, axis=0) for p in zip(*parts, strict=True))


# ----------------------------------------------------------------------------- ordered sums


def sum_blocks(values: np.ndarray) -> np.ndarray:
    """Sum over the last axis (each block's values) strictly left to right from 0.0f, like a C loop."""
    values = np.asarray(values, dtype=F32)
    if values.shape[-1] == 0:
        return np.zeros(values.shape[:-1], dtype=F32)
    total = values[..., 0].copy()
    for j in range(1, values.shape[-1]):
        total += values[..., j]
    return total


def _reduce_groups_in_order(values: np.ndarray, initial: np.float32 | None) -> np.ndarray | None:
    """One `np.add.reduce` over the leading axis, where numpy is known to add row after row.

    numpy sums the outer axis of a C-contiguous array one whole row at a time, which is C's order;
    its pairwise summation only applies along a contiguous axis, which is what a row of a single
    group would be, so that case (and any other layout) gets None and the explicit loop.
    """
    if values.dtype != F32 or not values.flags.c_contiguous or values[0].size < 2:
        return None
    flat = values.reshape(values.shape[0], -1)
    total = np.add.reduce(flat, axis=0) if initial is None else np.add.reduce(flat, axis=0, initial=initial)
    return total.reshape(values.shape[1:])


def sum_groups(values: np.ndarray) -> np.ndarray:
    """Sum over the leading axis (each group's values) strictly in order, starting from 0.0f."""
    total = _reduce_groups_in_order(values, F32(0))
    if total is not None:
        return total
    acc = np.zeros(values.shape[1:], dtype=F32)
    for row in values:
        acc += row
    return acc


def sum_groups_from_first(values: np.ndarray) -> np.ndarray:
    """Sum over the leading axis in order, seeded with the first value (`make_qkx2_quants` does this)."""
    total = _reduce_groups_in_order(values, None)
    if total is not None:
        return total
    acc = values[0].astype(F32, copy=True)
    for row in values[1:]:
        acc += row
    return acc


# ----------------------------------------------------------------------------- layouts


def to_groups(blocks: np.ndarray, size: int) -> np.ndarray:
    """Blocks `[n, k * size]` to value-major groups `[size, n * k]` (a copy, C-contiguous)."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def from_groups(values: np.ndarray, n_blocks: int) -> np.ndarray:
    """Inverse of `to_groups` (also for per-group vectors `[n * k]` -> `[n, k]`)."""
    return values.T.reshape(n_blocks, -1) if values.ndim == 2 else values.reshape(n_blocks, -1)


# ----------------------------------------------------------------------------- extremes


def signed_absmax_groups(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group: largest |x| and the signed value first reaching it, as a strict `>` loop keeps the
    first. An all-zero group gives +0.0 for both (fabsf of any zero), which fixes the sign of a zero scale."""
    vmax, vmin = groups.max(axis=0), groups.min(axis=0)
    signed = np.where(vmax >= -vmin, vmax, vmin)
    ties = np.flatnonzero((vmax == -vmin) & (vmax > 0))  # +a and -a both present: the first one wins
    if ties.size:
        tied = groups[:, ties]
        signed[ties] = np.take_along_axis(tied, np.argmax(np.abs(tied), axis=0)[None], axis=0)[0]
    amax = np.abs(signed)
    return amax.astype(F32), np.where(amax > 0, signed, F32(0)).astype(F32)


def signed_absmax_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`signed_absmax_groups` for blocks `[..., block]`: per block, largest |x| and its signed value.

    Reduced over a value-major copy: numpy reduces a short contiguous axis ~8x slower than across rows.
    """
    amax, signed = signed_absmax_groups(to_groups(blocks, blocks.shape[-1]))
    return amax.reshape(blocks.shape[:-1]), signed.reshape(blocks.shape[:-1])


def min_max_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block min and max as C loops with strict comparisons find them: among equal zeros, the first one's sign."""
    groups = to_groups(blocks, blocks.shape[-1])
    extremes = (groups.min(axis=0).reshape(blocks.shape[:-1]), groups.max(axis=0).reshape(blocks.shape[:-1]))
    return tuple(_first_zero_sign(blocks, value) for value in extremes)  # type: ignore[return-value]


def _first_zero_sign(blocks: np.ndarray, value: np.ndarray) -> np.ndarray:
    is_zero = value == 0
    if is_zero.any():
        first_zero = np.argmax(blocks == 0, axis=-1)
        zero = np.take_along_axis(blocks, first_zero[..., None], axis=-1)[..., 0]
        value = np.where(is_zero, zero, value)
    return value.astype(F32)


def absmax_blocks(blocks: np.ndarray) -> np.ndarray:
    """Per block the largest |x| (the `amax = max(amax, fabsf(x))` loops; +0.0 for an all-zero block).

    Blocks of 64 values or more are reduced in place; shorter ones over a value-major copy, as numpy
    reduces a short contiguous axis slowly."""
    if blocks.shape[-1] >= 64:
        return np.abs(blocks).max(axis=-1).astype(F32, copy=False)
    return np.abs(to_groups(blocks, blocks.shape[-1])).max(axis=0).reshape(blocks.shape[:-1]).astype(F32)


def max_positive_blocks(values: np.ndarray) -> np.ndarray:
    """Per block `max(0, values...)`, the `if (v > best) best = v` loops seeded with 0."""
    return np.maximum(values.max(axis=-1), F32(0)).astype(F32)


# ----------------------------------------------------------------------------- elementwise


def nearest(values: np.ndarray) -> np.ndarray:
    """llama.cpp's `nearest_int` as float32 (add 1.5 * 2**23, read the mantissa): round half to even,
    exact for |value| < 2**22. Levels stay float32 (exact small integers) and mix with floats as C's ints do."""
    return np.rint(values).astype(F32, copy=False)


def nearest_exact(values: np.ndarray) -> np.ndarray:
    """`nearest_int` bit for bit also where it is garbage (|value| >= 2**22, not finite), as float32 levels:
    for kernels whose trial scales can make `value` huge before a clip (the i-quants' lattice searches)."""
    shifted = np.asarray(values, dtype=F32) + F32(12582912)
    return ((shifted.view(np.int32) & 0x007FFFFF) - 0x00400000).astype(F32)


def unit_round_half_away(scaled: np.ndarray) -> np.ndarray:
    """C's `roundf` / `lroundf` of values within (-1.5, 1.5) (each x times 1/max|x| of its block): -1, 0 or 1
    as int8, halves away from zero. Non-finite values give 0 or +-1; their callers decide what C does there."""
    return (scaled >= F32(0.5)).view(np.int8) - (scaled <= F32(-0.5)).view(np.int8)


def divide_where(num: np.ndarray, den: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """`ok ? num / den : 0` in float32, without warnings where `ok` is false."""
    out = np.zeros(np.broadcast_shapes(np.shape(num), np.shape(den), np.shape(ok)), dtype=F32)
    np.divide(num, den, out=out, where=ok)
    return out


def reciprocal_where_nonzero(values: np.ndarray) -> np.ndarray:
    """`v ? 1/v : 0` in float32 (the `id = d ? 1.0f/d : 0.0f` of the kernels)."""
    values = np.asarray(values, dtype=F32)
    return divide_where(F32(1), values, values != 0)


def to_uint8(levels: np.ndarray) -> np.ndarray:
    """C's int -> uint8_t conversion (modulo 256)."""
    return (levels.astype(np.int64) & 0xFF).astype(np.uint8)


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 `[n]` to ggml half bytes `[n, 2]` (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.ascontiguousarray(np.asarray(values, dtype=F32).astype(np.float16)).view(np.uint8).reshape(-1, 2)


def fp16_round(values: np.ndarray) -> np.ndarray:
    """float32 values rounded through fp16 and back: what a kernel reads back from a stored scale."""
    return np.asarray(values, dtype=F32).astype(np.float16).astype(F32)


def fp16_scale(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A scale as a kernel stores it and then uses it: (`fp16_bytes`, `fp16_round`)."""
    return fp16_bytes(values), fp16_round(values)


# ----------------------------------------------------------------------------- packing (blocks layout)


def pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """Levels `[n, 32]` (0..15) to ggml's `qs[16]`: value j in the low nibble, value j+16 in the high one."""
    low = levels[:, :16].astype(np.uint8) & 0x0F
    high = levels[:, 16:].astype(np.uint8) & 0x0F
    return low | (high << 4)


def pack_bit4(levels: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 levels `[n, 32]` as the little-endian uint32 `qh` of Q5_0 / Q5_1 (`[n, 4]`)."""
    bits = (levels.astype(np.uint8) >> 4) & 1
    return np.packbits(bits, axis=-1, bitorder="little")


def pack_bits(flags: np.ndarray) -> np.ndarray:
    """Booleans `[n, k, m]` to bytes `[n, m]`: bit j of byte l is `flags[:, j, l]` (k <= 8), the layout of
    the K-quants' high-bit masks (`hmask`, `qh`), where value `m * j + l` sets bit j of byte l."""
    return np.packbits(flags, axis=1, bitorder="little")[:, 0]
