"""Tensor types a GGUF file may hold: ggml's (gguf-py's table), and any a higher layer registers
(this project's own Q3_K_HIFI registers itself from `imatrix.quant`)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from imatrix.errors import ImatrixError

Dequantize = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ExtraType:
    qtype: enum.IntEnum
    block_size: int
    type_size: int
    dequantize: Dequantize


_EXTRA: dict[int, ExtraType] = {}


def register_type(qtype: enum.IntEnum, block_size: int, type_size: int, dequantize: Dequantize) -> None:
    """Make a type readable that gguf-py cannot dequantize: one ggml does not know (an id outside ggml's),
    or a ggml type gguf-py lists without a dequantizer."""
    _EXTRA[int(qtype)] = ExtraType(qtype, block_size, type_size, dequantize)


def tensor_type(type_id: int) -> enum.IntEnum:
    """The type a GGUF tensor info names: one of ggml's, or a registered one."""
    if type_id in gguf.GGMLQuantizationType._value2member_map_:
        return gguf.GGMLQuantizationType(type_id)
    if type_id in _EXTRA:
        return _EXTRA[type_id].qtype
    raise ImatrixError(f"unknown tensor type {type_id}")


def type_sizes(qtype: enum.IntEnum) -> tuple[int, int]:
    """(values per block, bytes per block) of any readable tensor type."""
    if qtype in gguf.GGML_QUANT_SIZES:
        return gguf.GGML_QUANT_SIZES[qtype]  # type: ignore[index]
    extra = _EXTRA.get(int(qtype))
    if extra is None:
        raise ImatrixError(f"tensor type {qtype.name} is not supported")
    return extra.block_size, extra.type_size


def dequantize(data: np.ndarray, qtype: enum.IntEnum) -> np.ndarray:
    """Stored bytes `[..., k * type_size]` of any readable type to float32 `[..., k * block_size]`."""
    extra = _EXTRA.get(int(qtype))
    if extra is not None and qtype not in gguf.GGML_QUANT_SIZES:
        return extra.dequantize(data)
    try:
        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    except NotImplementedError:
        if extra is not None:
            return extra.dequantize(data)
        raise ImatrixError(f"tensor type {qtype.name} cannot be dequantized") from None
