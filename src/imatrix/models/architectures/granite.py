"""IBM Granite 3.x (`granite`) and Granite MoE (`granitemoe`, with or without shared experts): llama with
scaling multipliers.

The converter writes the checkpoint's multipliers under llama.cpp's names (`embedding_scale`,
`residual_scale`, `attention.scale`, `logit_scale`) and permutes q/k rows as for llama.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, Config, Fused, common_config


def granite_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    # the converter drops head_dim: llama.cpp's heads are hidden / n_head wide
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    # an absent (or zero) multiplier is llama.cpp's "none": 1, and 1/√head_dim for attention (granite.cpp)
    return {**config, "head_dim": head_dim,
            "embedding_multiplier": float(model_file.arch_value("embedding_scale") or 1.0),
            "residual_multiplier": float(model_file.arch_value("residual_scale") or 1.0),
            "attention_multiplier": float(model_file.arch_value("attention.scale") or 1 / math.sqrt(head_dim)),
            "logits_scaling": float(model_file.require_arch("logit_scale"))}


def granitemoe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # feed_forward_length is the expert width
    return {**granite_config(model_file), "num_local_experts": int(model_file.require_arch("expert_count")),
            "num_experts_per_tok": int(model_file.require_arch("expert_used_count"))}


def has_shared_experts(model_file: GGUFModelFile) -> bool:
    return bool(model_file.arch_value("expert_shared_feed_forward_length"))


def granitemoeshared_config(model_file: GGUFModelFile) -> dict[str, Any]:
    shared = int(model_file.require_arch("expert_shared_feed_forward_length"))
    return {**granitemoe_config(model_file), "shared_intermediate_size": shared}


def divided_logits(logits: torch.Tensor, config: Config) -> torch.Tensor:
    return logits / config.logits_scaling


# transformers' router holds its weight itself; checkpoints (and gguf-py) name it `router.layer`
ROUTER = ((r"model\.layers\.(\d+)\.block_sparse_moe\.router\.weight", r"blk.\1.ffn_gate_inp.weight"),)
# the shared experts' gate and up rows, in one Linear, which the converter splits
SHARED_GATE_UP = (Fused("shared_mlp.input_linear", ("ffn_gate_shexp", "ffn_up_shexp")),)

ARCHITECTURES = (
    Architecture("granite", "GraniteForCausalLM", "GraniteConfig", granite_config, ("granite",), permute_qk=True,
                 logits=divided_logits),
    Architecture("granitemoe", "GraniteMoeForCausalLM", "GraniteMoeConfig", granitemoe_config, ("granitemoe",),
                 permute_qk=True, extra_names=ROUTER, logits=divided_logits),
    Architecture("granitemoe", "GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", granitemoeshared_config,
                 ("granitemoeshared",), applies_to=has_shared_experts, is_variant=True, permute_qk=True,
                 fused=SHARED_GATE_UP, extra_names=ROUTER, logits=divided_logits),
)
