"""GLM-4 (`glm4`: post-attention and post-MLP norms, fused gate/up, partial rotary) and GLM-4.5 (`glm4moe`)."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, partial_rotary, routed_experts


def glm4_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    return {**config, **partial_rotary(model_file, config["head_dim"]),
            "attention_bias": "blk.0.attn_q.bias" in model_file.tensors}


def glm4moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # the routing as llama.cpp's glm4moe graph runs it: sigmoid scores, the selection bias, the GGUF's
    # normalisation and scale of the top-k weights
    return {**glm4_config(model_file), **routed_experts(model_file, count="n_routed_experts"),
            "use_qk_norm": "blk.0.attn_q_norm.weight" in model_file.tensors,
            "n_shared_experts": int(model_file.arch_value("expert_shared_count", 0)),
            "first_k_dense_replace": int(model_file.arch_value("leading_dense_block_count", 0)),
            "norm_topk_prob": bool(model_file.arch_value("expert_weights_norm", False)),
            "routed_scaling_factor": float(model_file.arch_value("expert_weights_scale", 1.0) or 1.0),
            "n_group": int(model_file.arch_value("expert_group_count", 0) or 1),
            "topk_group": int(model_file.arch_value("expert_group_used_count", 0) or 1)}


ARCHITECTURES = (
    Architecture("glm4", "Glm4ForCausalLM", "Glm4Config", glm4_config, ("glm4",)),
    Architecture("glm4moe", "Glm4MoeForCausalLM", "Glm4MoeConfig", glm4moe_config, ("glm4_moe",)),
)
