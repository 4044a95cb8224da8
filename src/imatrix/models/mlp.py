"""Gated feed-forward blocks (SwiGLU) computed in place when nothing needs their gradient.

transformers computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: the activation and the product
are two more [n_tokens, n_ff] tensors, allocated while the gate and up projections are still alive.
For two 512-token SmolLM2 chunks per forward in each of two threads (`pipeline.executors`), that is
4 × 6 MB at the peak of the MLP, held as freed heap afterwards. Applied in place (SiLU, then the
product), the values are the same bits and the down projection's hook sees the same input.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP

from imatrix.models.patches import swap_class


class InPlaceGatedMLP(torch.nn.Module):
    """Mixed into a transformers gated MLP class (see `compute_mlps_in_place`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd keeps the activation's input: the model's own forward
            return super().forward(x)
        gate = self.gate_proj(x)
        activated = F.silu(gate, inplace=True) if type(self.act_fn) in (SiLUActivation, torch.nn.SiLU) \
            else self.act_fn(gate)
        return self.down_proj(activated.mul_(self.up_proj(x)))


@functools.cache
def _in_place_class(mlp_class: type) -> type:
    return type(f"InPlace{mlp_class.__name__}", (InPlaceGatedMLP, mlp_class), {})


def compute_mlps_in_place(model: torch.nn.Module) -> int:
    """Switch every gated MLP of `model` whose forward is llama's (Qwen2/3's and the MoE models' shared
    experts are copies of it) to the in-place forward; the module objects stay the same. MLPs that
    scale, clamp or normalise on the way keep their own forward. Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if not isinstance(module, InPlaceGatedMLP) and _computes_llamas_mlp(type(module)):
            swap_class(module, _in_place_class(type(module)))
            switched += 1
    return switched


def _computes_llamas_mlp(module_class: type) -> bool:
    """Whether the class's forward is `LlamaMLP.forward` or a copy of it (transformers copies code
    between models: the same source compiles to the same bytecode and names)."""
    forward = getattr(module_class.forward, "__code__", None)
    reference = LlamaMLP.forward.__code__
    return forward is not None and forward.co_code == reference.co_code and forward.co_names == reference.co_names
