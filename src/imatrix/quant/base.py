"""One table of quantization types: each type is a class working on 2-D arrays of blocks.

A type subclasses `QuantType` with `qtype=...`; `__init_subclass__` registers it. Kernels take
`blocks: float32 [n_blocks, block_size]` and optional per-element importance `weights` of the same
shape (the imatrix column values, tiled per block), and return `uint8 [n_blocks, type_size]` bytes
in ggml's block layout. Dequantization is gguf-py's (`gguf.quants.dequantize`).
"""

from __future__ import annotations

import enum
from typing import ClassVar

import gguf
import numpy as np

from imatrix.errors import ImatrixError
from imatrix.ggufio.types import register_type

QType = gguf.GGMLQuantizationType


class QuantType:
    qtype: ClassVar[QType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    registry: ClassVar[dict[QType, type[QuantType]]] = {}

    def __init_subclass__(cls, qtype: QType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:
            return
        cls.qtype = qtype
        cls.block_size, cls.type_size = gguf.GGML_QUANT_SIZES[qtype]
        QuantType.registry[qtype] = cls

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
        if imatrix_row is not None:
            tiled = np.broadcast_to(np.asarray(imatrix_row, dtype=np.float32), (n_rows, n_cols))
            weights = np.ascontiguousarray(tiled).reshape(-1, cls.block_size)
        return cls.quantize_blocks(blocks, weights).reshape(n_rows, -1)

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        """Bytes `[..., k * type_size]` to float32 `[..., k * block_size]` (gguf-py's, for ggml types)."""
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
