"""Which modules are measured, and under which GGUF name."""

from __future__ import annotations

import torch

from imatrix.models.loader import LoadedModel

OUTPUT_WEIGHT = "output.weight"


def collection_targets(loaded: LoadedModel, process_output: bool) -> dict[str, torch.nn.Module]:
    """GGUF name -> nn.Linear for every matmul llama-imatrix collects (`blk.*`, optionally output)."""
    modules = dict(loaded.model.named_modules())
    targets = {}
    tied = bool(getattr(loaded.config, "tie_word_embeddings", False))
    for param, gguf_name in loaded.gguf_names.items():
        module = modules.get(param.rpartition(".")[0])
        if not isinstance(module, torch.nn.Linear) or not param.endswith(".weight"):
            continue
        wanted = gguf_name.startswith("blk.") or (process_output and gguf_name == OUTPUT_WEIGHT and not tied)
        if wanted:
            targets[gguf_name] = module
    return targets
