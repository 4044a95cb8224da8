"""Routed-expert weights: which GGUF stacks (`blk.N.ffn_{gate,up,down}_exps.weight`) a model's
expert parameters correspond to.

transformers (5.x) keeps the experts of a MoE layer as 3-D parameters (`gate_up_proj`
`[n_expert, 2·n_ff, n_embd]`, `down_proj` `[n_expert, n_embd, n_ff]`) in modules decorated with
`use_experts_implementation`; llama.cpp keeps gate and up apart. gguf-py's tensor map knows neither
`gate_up_proj` nor the suffix-less parameter names, so these are mapped here by hand.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import torch

GATE, UP, DOWN = "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def stack_name(block: int, kind: str) -> str:
    return f"blk.{block}.{kind}.weight"


def is_fused_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module holding all experts in 3-D parameters."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.nn.Parameter) and down.dim() == 3 and hasattr(module, "has_gate")


def expert_block(module_path: str, tensor_map: gguf.TensorNameMap | None = None) -> int | None:
    """Block index of the experts module at `module_path` (`model.layers.3.mlp.experts` -> 3)."""
    if tensor_map is not None:
        mapped = tensor_map.get_name(f"{module_path}.down_proj.weight", try_suffixes=(".weight",))
        if mapped is not None and mapped.startswith("blk."):
            return int(mapped.split(".")[1])
    found = _LAYER_INDEX.search(module_path)
    return int(found.group(1)) if found else None


def fused_expert_stacks(model: torch.nn.Module, tensor_map: gguf.TensorNameMap) -> dict[str, tuple[str, ...]]:
    """3-D expert parameter name -> the GGUF stacks it is made of, in concatenation order."""
    stacks: dict[str, tuple[str, ...]] = {}
    for path, module in model.named_modules():
        if not is_fused_experts(module):
            continue
        block = expert_block(path, tensor_map)
        if block is None:
            continue
        if module.has_gate:
            stacks[f"{path}.gate_up_proj"] = (stack_name(block, GATE), stack_name(block, UP))
        else:
            stacks[f"{path}.up_proj"] = (stack_name(block, UP),)
        stacks[f"{path}.down_proj"] = (stack_name(block, DOWN),)
    return stacks


def join_stacks(stacks: list[np.ndarray]) -> np.ndarray:
    """`gate_up_proj` is gate rows then up rows for each expert: [E, n_ff, n_embd] ×2 -> [E, 2·n_ff, n_embd]."""
    return stacks[0] if len(stacks) == 1 else np.concatenate(stacks, axis=1)
