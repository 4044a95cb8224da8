"""Which modules are measured, and under which GGUF name."""

from __future__ import annotations

import gguf
import torch

from imatrix.collect.moe import ExpertTarget, expert_targets
from imatrix.models.loader import LoadedModel

OUTPUT_WEIGHT = "output.weight"
# MoE routers are matmuls in llama.cpp (`ffn_gate_inp`), but transformers' router modules are no
# nn.Linear: they hold a 2-D `weight` and take the hidden states as their first argument
ROUTER_SUFFIXES = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")


def collection_targets(loaded: LoadedModel, process_output: bool) -> dict[str, torch.nn.Module | ExpertTarget]:
    """GGUF name -> what llama-imatrix collects for it: an `nn.Linear` or router whose input is
    measured (`blk.*`, optionally output), or the routed experts of a MoE layer (`*_exps`)."""
    modules = dict(loaded.model.named_modules())
    targets: dict[str, torch.nn.Module | ExpertTarget] = {}
    tied = bool(getattr(loaded.config, "tie_word_embeddings", False))
    for param, gguf_names in loaded.gguf_names.items():
        module = modules.get(param.rpartition(".")[0])
        for gguf_name in gguf_names:
            if not param.endswith(".weight") or not _is_matmul(module, gguf_name):
                continue
            wanted = gguf_name.startswith("blk.") or (process_output and gguf_name == OUTPUT_WEIGHT and not tied)
            if wanted:
                targets[gguf_name] = module
    targets.update(expert_targets(loaded.model, _tensor_map(loaded)))
    return targets


def _is_matmul(module: torch.nn.Module | None, gguf_name: str) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return gguf_name.endswith(ROUTER_SUFFIXES) and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _tensor_map(loaded: LoadedModel) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(loaded.architecture.gguf_arch, loaded.config.num_hidden_layers)
