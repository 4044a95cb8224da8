"""One table of quantization types: each type is a class working on 2-D arrays of blocks.

A type subclasses `QuantType` with `qtype=...`; `__init_subclass__` registers it. Kernels take
`blocks: float32 [n_blocks, block_size]` and optional per-element importance `weights` of the same
shape (the imatrix column values, tiled per block), and return `uint8 [n_blocks, type_size]` bytes
in ggml's block layout. Dequantization is gguf-py's (`gguf.quants.dequantize`).

Adding a ggml type, e.g. IQ2_XXS:

1. In a module of its family (`quant/iq2.py`), a short class named as ggml names the type:
   `class IQ2_XXS(QuantType, qtype=QType.IQ2_XXS)` with `quantize_blocks(blocks, weights)`; block and
   type sizes come from gguf-py. A type whose C kernel looks at the whole row (a `sigma2` over the
   row, as the legacy types have) overrides `quantize(rows, imatrix_row)` instead. A type gguf-py does
   not know yet (Q2_0) is `ggml_type("Q2_0")`, a `NewGGMLType` stand-in with ggml's id and sizes; its
   class also overrides `dequantize`, which then reads such tensors everywhere.
2. Build it from `blocks.py` (ordered sums, extremes, fp16 scales, packing; each name says whether it
   takes the *blocks* or the *groups* layout) and `searches.py` (ggml-quants.c's scale searches). Tables
   a kernel needs (grids, neighbour maps) are module constants built once on first use
   (`functools.cache`), never per call. Work in steps (`blocks.steps` / `in_steps`) so temporaries stay small.
3. Import the module in `quant/__init__.py`.
4. `mixes.py` already knows every llama.cpp file type, mix rule, fallback and which types need an
   imatrix; a file type becomes usable once each type its mix picks is registered here.
5. Tests: `tests/test_quant_<family>.py` compares with llama-quantize's blocks
   (`tests/quant_golden.compare_with_golden`, goldens `<TYPE>-im.gguf` / `<TYPE>-noim.gguf` in
   `/work/shared/golden/quant`, made by `llama-quantize --pure`), plus the reconstruction invariants.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar

import gguf
import numpy as np

from imatrix.errors import ImatrixError
from imatrix.ggufio.types import register_type, type_sizes

QType = gguf.GGMLQuantizationType


class NewGGMLType(enum.IntEnum):
    """ggml types (with ggml's ids) that the installed gguf-py does not list yet."""

    Q2_0 = 42


# block size and bytes per block of each, from ggml-common.h
NEW_GGML_SIZES = {NewGGMLType.Q2_0: (64, 18)}


def ggml_type(name: str) -> enum.IntEnum:
    """A ggml type by its enum name (`Q2_0`): gguf-py's member, or this module's stand-in while gguf-py lacks it."""
    return QType[name] if name in QType.__members__ else NewGGMLType[name]


def _not_readable_yet(qtype: enum.IntEnum) -> Callable[[np.ndarray], np.ndarray]:
    def dequantize(data: np.ndarray) -> np.ndarray:
        raise ImatrixError(f"tensor type {qtype.name} cannot be dequantized yet")

    return dequantize


for _stand_in, (_block, _size) in NEW_GGML_SIZES.items():
    if _stand_in.name not in QType.__members__:  # sized, so that mixes and --dry-run know it; a kernel replaces this
        register_type(_stand_in, _block, _size, _not_readable_yet(_stand_in))


class QuantType:
    qtype: ClassVar[QType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    registry: ClassVar[dict[QType, type[QuantType]]] = {}
    # False for a type whose llama.cpp kernel ignores the imatrix: the default `quantize` then passes no weights
    reads_imatrix: ClassVar[bool] = True

    def __init_subclass__(cls, qtype: QType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:
            return
        cls.qtype = qtype
        cls.block_size, cls.type_size = type_sizes(qtype)
        QuantType.registry[qtype] = cls
        # a stand-in (`NewGGMLType`), or a type gguf-py lists but cannot dequantize (Q1_0): files are read
        # through the class's own `dequantize`
        if qtype not in gguf.GGML_QUANT_SIZES or "dequantize" in cls.__dict__:
            register_type(qtype, cls.block_size, cls.type_size, cls.dequantize)

    @classmethod
    def register_extra(cls, qtype: enum.IntEnum, block_size: int, type_size: int) -> None:
        """Register a class for a type of this project's own, which ggml does not know, readable in GGUF files."""
        cls.qtype, cls.block_size, cls.type_size = qtype, block_size, type_size  # type: ignore[assignment]
        QuantType.registry[qtype] = cls  # type: ignore[index]
        register_type(qtype, block_size, type_size, cls.dequantize)

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def quantize(cls, rows: np.ndarray, imatrix_row: np.ndarray | None) -> np.ndarray:
        """Rows `[n_rows, n_cols]` to bytes `[n_rows, n_cols // block_size * type_size]`.

        The default tiles the imatrix over blocks; a type whose weights need row context (llama.cpp
        derives `sigma2` from the whole row for several types) overrides this and passes it on.
        """
        n_rows, n_cols = rows.shape
        blocks = rows.reshape(-1, cls.block_size)
        weights = None
        if imatrix_row is not None and cls.reads_imatrix:
            tiled = np.broadcast_to(np.asarray(imatrix_row, dtype=np.float32), (n_rows, n_cols))
            weights = np.ascontiguousarray(tiled).reshape(-1, cls.block_size)
        return cls.quantize_blocks(blocks, weights).reshape(n_rows, -1)

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        """Bytes `[..., k * type_size]` to float32 `[..., k * block_size]` (gguf-py's, for ggml types; a
        `NewGGMLType` stand-in overrides this)."""
        return np.asarray(gguf.quants.dequantize(data, cls.qtype), dtype=np.float32)


def quant_type(qtype: QType) -> type[QuantType]:
    try:
        return QuantType.registry[qtype]
    except KeyError:
        raise ImatrixError(f"quantization type {qtype.name} is not supported") from None


def quantize_rows(data: np.ndarray, qtype: QType, imatrix_row: np.ndarray | None = None) -> np.ndarray:
    """Quantize `data [n_rows, n_cols]`; `imatrix_row [n_cols]` weights every row alike.

    Returns uint8 `[n_rows, n_cols // block_size * type_size]`, the tensor's bytes as ggml stores them.
    """
    kind = quant_type(qtype)
    rows = np.ascontiguousarray(data, dtype=np.float32)
    n_rows, n_cols = rows.shape
    if n_cols % kind.block_size:
        raise ImatrixError(f"{qtype.name} needs rows divisible by {kind.block_size}, got {n_cols}")
    return kind.quantize(rows, imatrix_row)
