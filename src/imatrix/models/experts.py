"""Routed-expert weights: which GGUF stacks (`blk.N.ffn_{gate,up,down}_exps.weight`) a model's
expert parameters correspond to.

transformers (5.x) keeps the experts of a MoE layer as 3-D parameters (`gate_up_proj`
`[n_expert, 2·n_ff, n_embd]`, `down_proj` `[n_expert, n_embd, n_ff]`) in modules decorated with
`use_experts_implementation`; llama.cpp keeps gate and up apart. gguf-py's tensor map knows neither
`gate_up_proj` nor the suffix-less parameter names, so these are mapped here by hand, with the experts'
biases (`gate_up_proj_bias`, `down_proj_bias`) where the module has them. How the stacks join into
the checkpoint's parameter is the adapter's `StackJoin`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np
import torch

GATE, UP, DOWN = "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"
GATE_UP = "ffn_gate_up_exps"  # gate and up in one stack, as the checkpoint's `gate_up_proj` (`StackJoin.fused_gate_up`)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def stack_name(block: int, kind: str, leaf: str = "weight") -> str:
    return f"blk.{block}.{kind}.{leaf}"


def is_fused_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module holding all experts in 3-D parameters."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.nn.Parameter) and down.dim() == 3 and hasattr(module, "has_gate")


def is_batched_experts(module: torch.nn.Module) -> bool:
    """Llama 4's experts: 3-D `gate_up_proj` and `down_proj` run over every expert's copy of the tokens
    (`bmm`), in a module transformers' experts implementations do not cover (no `has_gate`)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (not hasattr(module, "has_gate") and isinstance(gate_up, torch.nn.Parameter) and gate_up.dim() == 3
            and isinstance(down, torch.nn.Parameter) and down.dim() == 3)


def routes_to_experts(names: dict[str, tuple[str, ...]]) -> bool:
    """Whether a model whose parameters have these GGUF names is a MoE one: it has expert stacks
    (`*_exps`) or routers (`ffn_gate_inp`)."""
    return any("_exps." in name or ".ffn_gate_inp." in name for gguf_names in names.values() for name in gguf_names)


def expert_block(module_path: str, tensor_map: gguf.TensorNameMap | None = None) -> int | None:
    """Block index of the experts module at `module_path` (`model.layers.3.mlp.experts` -> 3)."""
    if tensor_map is not None:
        mapped = tensor_map.get_name(f"{module_path}.down_proj.weight", try_suffixes=(".weight",))
        if mapped is not None and mapped.startswith("blk."):
            return int(mapped.split(".")[1])
    found = _LAYER_INDEX.search(module_path)
    return int(found.group(1)) if found else None


def fused_expert_stacks(model: torch.nn.Module, tensor_map: gguf.TensorNameMap,
                        join: StackJoin | None = None) -> dict[str, tuple[str, ...]]:
    """3-D expert parameter name -> the GGUF stacks it is made of, in concatenation order."""
    stacks: dict[str, tuple[str, ...]] = {}
    for path, module in model.named_modules():
        if not (is_fused_experts(module) or is_batched_experts(module)):
            continue
        block = expert_block(path, tensor_map)
        if block is None:
            continue
        gate_up = (GATE_UP,) if join is not None and join.fused_gate_up else (GATE, UP)
        inputs = ("gate_up_proj", gate_up) if getattr(module, "has_gate", True) else ("up_proj", (UP,))
        for param, kinds in (inputs, ("down_proj", (DOWN,))):
            stacks[f"{path}.{param}"] = tuple(stack_name(block, kind) for kind in kinds)
            if getattr(module, "has_bias", False):
                stacks[f"{path}.{param}_bias"] = tuple(stack_name(block, kind, "bias") for kind in kinds)
    return stacks


@dataclass(frozen=True)
class StackJoin:
    """How GGUF expert stacks (`[E, n_out, n_in]`, biases `[E, n_out]`) make a 3-D expert parameter.

    The default is transformers' usual layout: gate rows then up rows, `[E, n_out, n_in]`.
    """

    interleaved: bool = False  # gate and up outputs alternate (gpt-oss: gate even, up odd)
    transposed: bool = False  # weights stored `[E, n_in, n_out]`
    fused_gate_up: bool = False  # the file keeps gate and up in one stack `ffn_gate_up_exps` (Gemma 4)

    def join(self, stacks: list[np.ndarray]) -> np.ndarray:
        """One parameter from its stacks (gate and up, or one stack alone), in checkpoint layout."""
        first = stacks[0]
        if len(stacks) == 1:
            joined = first
        elif self.interleaved:
            joined = np.stack(stacks, axis=2).reshape(first.shape[0], -1, *first.shape[2:])
        else:
            joined = np.concatenate(stacks, axis=1)
        return joined.swapaxes(1, 2) if self.transposed and joined.ndim == 3 else joined
