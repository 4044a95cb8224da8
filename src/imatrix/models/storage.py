"""Weights kept at 16 bits when the file stores them so, widened to the compute dtype per matmul.

A float32 run of an F16 or BF16 model would otherwise hold every weight twice as large as the file
does (SmolLM2-135M: 0.54 GB instead of 0.27 GB). Widening is exact, so the results are the same
bits; it costs one conversion of each weight per forward (~1% of the matmul time on CPU).
Only parameters of plain `nn.Linear` and `nn.Embedding` modules are kept narrow: other modules
(MoE routers and expert stacks, norms) read their weights directly in the compute dtype.
"""

from __future__ import annotations

import enum

import gguf
import torch
import torch.nn.functional as F

# GGUF tensor type -> the torch dtype that holds its values exactly in 16 bits
_EXACT_16_BIT = {gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}


# weights up to this many values are widened whole; larger ones (a 49k-token output projection)
# a block of rows at a time, so that no full-size float32 copy is ever made
WIDEN_WHOLE_MAX_VALUES = 1 << 22


class WideningLinear(torch.nn.Linear):
    """An `nn.Linear` whose weight is stored narrower than its input and widened for each call."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's own signature
        if self.weight.numel() <= WIDEN_WHOLE_MAX_VALUES:
            return _widened_linear(input, self.weight, self.bias)
        output = input.new_empty(*input.shape[:-1], self.out_features)
        rows_per_block = max(1, WIDEN_WHOLE_MAX_VALUES // self.in_features)
        for first in range(0, self.out_features, rows_per_block):
            rows = slice(first, first + rows_per_block)
            bias = None if self.bias is None else self.bias[rows]
            output[..., rows] = _widened_linear(input, self.weight[rows], bias)
        return output


def _widened_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: A002
    return F.linear(input, weight.to(input.dtype), None if bias is None else bias.to(input.dtype))


class WideningEmbedding(torch.nn.Embedding):
    """An `nn.Embedding` stored narrower than the compute dtype: looked-up rows are widened."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return super().forward(input).to(self.compute_dtype)


def exact_16_bit_dtype(tensor_type: enum.IntEnum) -> torch.dtype | None:
    """The 16-bit torch dtype whose bit patterns are this GGUF type's (F16, BF16), else None."""
    return _EXACT_16_BIT.get(tensor_type)


def storage_dtype(tensor_type: enum.IntEnum, compute_dtype: torch.dtype, round_to_f16: bool = False) -> torch.dtype:
    """The dtype a weight of this GGUF type is kept in for a `compute_dtype` run.

    16-bit file types stay 16-bit under float32 compute; with `round_to_f16` every non-F32 weight
    is rounded to float16 anyway, so it is kept as float16 too.
    """
    if compute_dtype != torch.float32:
        return compute_dtype
    if round_to_f16 and tensor_type != gguf.GGMLQuantizationType.F32:
        return torch.float16
    return exact_16_bit_dtype(tensor_type) or compute_dtype


def narrow_capable_parameters(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that may be stored narrower than the compute dtype."""
    names = set()
    for module_name, module in model.named_modules():
        if type(module) in (torch.nn.Linear, torch.nn.Embedding):
            prefix = f"{module_name}." if module_name else ""
            names.update(f"{prefix}{param}" for param, _ in module.named_parameters(recurse=False))
    return names


def widen_narrow_modules(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Make every Linear/Embedding whose weight is narrower than `compute_dtype` widen it on use.

    The module objects stay the same (their class is swapped), so hooks and tied weights keep working.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dtype == compute_dtype:
            continue
        if type(module) is torch.nn.Linear:
            module.__class__ = WideningLinear
        elif type(module) is torch.nn.Embedding:
            module.__class__ = WideningEmbedding
            module.compute_dtype = compute_dtype
