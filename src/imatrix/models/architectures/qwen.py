"""Qwen 2 and 3, dense and MoE."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, routed_experts


def qwen3moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp's qwen3moe graph renormalises the top-k weights (build_moe_ffn with norm_w = true);
    # transformers' own GGUF loader ignores expert_feed_forward_length and builds the wrong expert size
    return {**common_config(model_file), **routed_experts(model_file), "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def qwen2moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = {**common_config(model_file), **routed_experts(model_file), "norm_topk_prob": False,
              "decoder_sparse_step": 1, "mlp_only_layers": []}
    shared = model_file.arch_value("expert_shared_feed_forward_length") or config["intermediate_size"]
    return {**config, "shared_expert_intermediate_size": int(shared)}


ARCHITECTURES = (
    Architecture("qwen2", "Qwen2ForCausalLM", "Qwen2Config", common_config, ("qwen2",)),
    Architecture("qwen3", "Qwen3ForCausalLM", "Qwen3Config", common_config, ("qwen3",)),
    Architecture("qwen2moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", qwen2moe_config, ("qwen2_moe",)),
    Architecture("qwen3moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", qwen3moe_config, ("qwen3_moe",)),
)
