"""Checkpoint parameter names -> the GGUF tensors llama.cpp stores them as.

gguf-py's tensor map knows most names; an adapter adds what it lacks (`Architecture.extra_names`) and
the parameters llama.cpp splits into several tensors (`Architecture.fused`). 3-D expert parameters
are mapped apart (`models.experts`).
"""

from __future__ import annotations

import re

import gguf
import torch

from imatrix.models.architectures.base import Architecture
from imatrix.models.experts import fused_expert_stacks

GGUFNames = dict[str, tuple[str, ...]]  # parameter -> GGUF tensor names, in the order `Fused.kinds` lists them
_BLOCK = re.compile(r"\.(\d+)\.")


def gguf_name_map(model: torch.nn.Module, architecture: Architecture, n_blocks: int) -> GGUFNames:
    """Every parameter of `model` that llama.cpp stores, with its GGUF tensor names (3-D experts left out)."""
    tensor_map = gguf.get_tensor_name_map(architecture.gguf_arch, n_blocks)
    experts = fused_expert_stacks(model, tensor_map, architecture.expert_join)
    names: GGUFNames = {}
    for param in model.state_dict():
        if param in experts:
            continue
        found = _gguf_names(param, architecture, tensor_map)
        if found:
            names[param] = found
    return names


def expert_stack_map(model: torch.nn.Module, architecture: Architecture, n_blocks: int) -> GGUFNames:
    """3-D expert parameter names -> the GGUF expert stacks they are made of (`gate_up_proj` -> gate, up)."""
    return fused_expert_stacks(model, gguf.get_tensor_name_map(architecture.gguf_arch, n_blocks),
                               architecture.expert_join)


def _gguf_names(param: str, architecture: Architecture, tensor_map: gguf.TensorNameMap) -> tuple[str, ...]:
    module, _, leaf = param.rpartition(".")  # leaf: weight or bias
    for fused in architecture.fused:
        if module.endswith(f".{fused.module}") and (block := _BLOCK.search(param)):
            return tuple(f"blk.{block.group(1)}.{kind}.{leaf}" for kind in fused.kinds)
    for stack in architecture.stacked:
        if stack.index(param) is not None:
            return (stack.gguf_name,)
    for pattern, template in architecture.extra_names:
        if (match := re.fullmatch(pattern, param)) is not None:
            return (match.expand(template),)
    name = tensor_map.get_name(_as_converter_names(param), try_suffixes=(".weight", ".bias"))  # keeps the suffix
    return (name,) if name is not None else ()


def _as_converter_names(param: str) -> str:
    """The renames `convert_hf_to_gguf.py` makes before its tensor map (`ModelBase.filter_tensors`): the routers'
    selection bias buffer is looked up as a `.bias`."""
    return re.sub(r"e_score_correction_bias$", "e_score_correction.bias", param)
