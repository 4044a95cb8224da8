"""Which modules are measured, and under which GGUF name."""

from __future__ import annotations

import gguf
import torch

from imatrix.collection.hooks import ReorderedInput, Target
from imatrix.collection.moe import expert_targets
from imatrix.models.loader import LoadedModel
from imatrix.models.observers import observed_targets

OUTPUT_WEIGHT = "output.weight"
# MoE routers are matmuls in llama.cpp (`ffn_gate_inp`), but transformers' router modules are no
# nn.Linear: they hold a 2-D `weight` and take the hidden states as their first argument
ROUTER_SUFFIXES = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")


def collection_targets(loaded: LoadedModel, process_output: bool) -> dict[str, Target]:
    """GGUF name -> what llama-imatrix collects for it: an `nn.Linear` or router whose input is
    measured (`blk.*`, optionally output), the routed experts of a MoE layer (`*_exps`), or an input
    the adapter's observers compute (which replaces what the module holding the weight would give)."""
    modules = dict(loaded.model.named_modules())
    targets: dict[str, Target] = {}
    tied = bool(getattr(loaded.config, "tie_word_embeddings", False))
    for param, gguf_names in loaded.gguf_names.items():
        module = modules.get(param.rpartition(".")[0])
        for gguf_name in gguf_names:
            if not param.endswith(".weight") or not _is_matmul(module, gguf_name):
                continue
            wanted = gguf_name.startswith("blk.") or (process_output and gguf_name == OUTPUT_WEIGHT and not tied)
            if wanted:
                targets[gguf_name] = _measured(loaded, module, gguf_name)
    targets.update(expert_targets(loaded.model, _tensor_map(loaded), loaded.architecture.expert_join.fused_gate_up))
    targets.update(observed_targets(loaded.architecture.observers, loaded.model, loaded.gguf_names))
    return targets


def _measured(loaded: LoadedModel, module: torch.nn.Module, gguf_name: str) -> torch.nn.Module | ReorderedInput:
    columns = loaded.architecture.file_columns(loaded.config, gguf_name)
    return module if columns is None else ReorderedInput(module, torch.as_tensor(columns, dtype=torch.long))


def _is_matmul(module: torch.nn.Module | None, gguf_name: str) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return gguf_name.endswith(ROUTER_SUFFIXES) and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _tensor_map(loaded: LoadedModel) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(loaded.architecture.gguf_arch, loaded.config.num_hidden_layers)
