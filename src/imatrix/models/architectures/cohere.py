"""Cohere Command-R (`command-r`) and Command R7B (`cohere2`): attention and MLP side by side on one
LayerNorm, logits multiplied by `logit_scale`; Command R7B interleaves sliding-window layers with
global ones that skip rotary embeddings."""

from __future__ import annotations

from typing import Any

import torch

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, Config, common_config, sliding_layer_types


def command_r_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp leaves the logits as they are when the file has no logit_scale (command-r.cpp)
    return {**common_config(model_file),
            "layer_norm_eps": float(model_file.require_arch("attention.layer_norm_epsilon")),
            "logit_scale": float(model_file.arch_value("logit_scale") or 1.0),
            "use_qk_norm": "blk.0.attn_q_norm.weight" in model_file.tensors}


def cohere2_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = command_r_config(model_file)
    if int(model_file.arch_value("rope.dimension_count", config["head_dim"])) != config["head_dim"]:
        raise ImatrixError(f"{model_file.path}: rotary embeddings over part of each head (rope.dimension_count) "
                           "are not supported for cohere2: transformers rotates whole heads")
    # llama.cpp: a period of 4 unless the file states the pattern (cohere2.cpp); global layers have no rope
    return {**config, "logit_scale": float(model_file.require_arch("logit_scale")),
            "sliding_window": int(model_file.require_arch("attention.sliding_window")),
            "layer_types": sliding_layer_types(model_file, 4)}


def scaled_logits(logits: torch.Tensor, config: Config) -> torch.Tensor:
    return logits * config.logit_scale


ARCHITECTURES = (
    Architecture("command-r", "CohereForCausalLM", "CohereConfig", command_r_config, ("cohere",),
                 logits=scaled_logits),
    Architecture("cohere2", "Cohere2ForCausalLM", "Cohere2Config", cohere2_config, ("cohere2",),
                 logits=scaled_logits),
)
