"""Every change this project makes to transformers' modules at run time goes through this module.

Three kinds, each applied by one function here:
- `swap_class`: a module's class is switched to a subclass (or a sibling) computing the same values, the
  module object and its parameters staying what they are:
  - `models.storage`: `nn.Linear`/`nn.Embedding` holding 16-bit weights widen them per call (half the memory
    of float32 weights);
  - `models.mlp`: gated MLPs whose forward is llama's compute in place (two fewer [n_tokens, n_ff] tensors
    alive at the MLP's peak; chosen by comparing the forward's bytecode with `LlamaMLP.forward`'s);
  - an adapter's `graph_fixes` (PhiMoE runs as Phi-3, as llama.cpp runs it: `architectures.phi`);
- `override_attribute`: a method of one module object is replaced while collecting, and restored after
  (`collection.moe`: llama.cpp counts tokens per expert, which transformers' expert forwards do not expose;
  `models.latent_attention`: DeepSeek's latent attention output, which llama.cpp multiplies);
- `register_attention`: the blocked causal attention (`models.attention`: torch's CPU kernel is ~30% slower
  on one causal [n, n] call) is registered with `AttentionInterface`, with sdpa's mask function.
Besides, the layer-by-layer path (`pipeline.sequential`, `models.weights.SafetensorsWeights`) calls
transformers' checkpoint-conversion internals, as `from_pretrained` does.

They lean on transformers internals, so `check_transformers` runs when this module is imported: a release
outside the tested range, or one whose internals moved, is refused before any model is built, instead of
computing something else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import torch
import transformers

from imatrix.errors import ImatrixError

# the transformers releases these patches were written and tested against: [first, last]
TESTED_TRANSFORMERS = ((5, 0), (5, 99))
# what the patches and the layer-by-layer loading use, by module
TRANSFORMERS_INTERNALS = {
    "transformers": ("AttentionInterface",),
    "transformers.masking_utils": ("AttentionMaskInterface", "sdpa_mask"),
    "transformers.integrations.sdpa_attention": ("sdpa_attention_forward",),
    "transformers.integrations.moe": ("ALL_EXPERTS_FUNCTIONS",),
    "transformers.models.llama.modeling_llama": ("LlamaMLP",),
    "transformers.modeling_layers": ("GradientCheckpointingLayer",),
    "transformers.conversion_mapping": ("get_model_conversion_mapping",),
    "transformers.core_model_loading": ("WeightConverter", "dot_natural_key", "rename_source_key"),
}


class Handle(Protocol):
    def remove(self) -> None: ...


def check_transformers(version: str = transformers.__version__) -> None:
    """Refuse a transformers release outside `TESTED_TRANSFORMERS`, and one whose internals moved."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    first, last = TESTED_TRANSFORMERS
    if not first <= major_minor <= last:
        raise ImatrixError(f"transformers {version} is not supported (tested: {first[0]}.{first[1]} to "
                           f"{last[0]}.{last[1]}); install 'transformers>=5,<6'")
    missing = [f"{module}.{name}" for module, names in TRANSFORMERS_INTERNALS.items() for name in names
               if not hasattr(importlib.import_module(module), name)]
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if "grouped_mm" not in ALL_EXPERTS_FUNCTIONS:
        missing.append("the grouped_mm experts function")
    if missing:
        raise ImatrixError(f"transformers {version} lacks {', '.join(missing)}, which imatrix relies on")


check_transformers()


def swap_class(module: torch.nn.Module, new_class: type) -> None:
    """Make `module` compute with `new_class`'s forward; the object, its parameters and hooks stay."""
    module.__class__ = new_class


class _Restore:
    """Handle that deletes an instance attribute set over a class attribute."""

    def __init__(self, module: torch.nn.Module, attribute: str) -> None:
        self.module, self.attribute = module, attribute

    def remove(self) -> None:
        self.module.__dict__.pop(self.attribute, None)


def override_attribute(module: torch.nn.Module, attribute: str, replacement: Callable) -> Handle:
    """Replace one module object's method (not its class's) until the returned handle is removed."""
    module.__dict__[attribute] = replacement
    return _Restore(module, attribute)


def register_attention(name: str, function: Callable) -> None:
    """Register an attention function with transformers, with sdpa's masks: without a mask function of its
    own, transformers builds no mask for it, and sliding windows would silently become causal attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def use_collection_forwards(model: torch.nn.Module) -> None:
    """Attention blocked on the CPU (`models.attention`) and MLPs in place (`models.mlp`): the same
    values as transformers' forwards, faster and in less memory."""
    from imatrix.models.attention import use_blocked_attention
    from imatrix.models.mlp import compute_mlps_in_place

    use_blocked_attention(model)
    compute_mlps_in_place(model)
