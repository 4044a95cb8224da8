"""Phi-3/3.5/4 (`phi3`: fused q/k/v and gate/up, LongRoPE) and Phi-3.5-MoE (`phimoe`)."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config

LONG_FACTORS, SHORT_FACTORS = "rope_factors_long.weight", "rope_factors_short.weight"


def phi3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    rope_dims = int(model_file.arch_value("rope.dimension_count") or config["head_dim"])
    original = int(model_file.arch_value("rope.scaling.original_context_length") or config["max_position_embeddings"])
    rope = {"rope_type": "default", "rope_theta": config.pop("rope_theta"),
            "partial_rotary_factor": rope_dims / config["head_dim"]}
    if LONG_FACTORS in model_file.tensors:
        # LongRoPE: the converter stores both factor sets as tensors; llama.cpp picks the long ones when the
        # context exceeds the original one (`llama_model::get_rope_factors`), as transformers does by length
        rope.update(rope_type="longrope", original_max_position_embeddings=original,
                    factor=config["max_position_embeddings"] / original,
                    long_factor=model_file.tensor_f32(LONG_FACTORS).tolist(),
                    short_factor=model_file.tensor_f32(SHORT_FACTORS).tolist(),
                    attention_factor=float(model_file.arch_value("rope.scaling.attn_factor", 1.0)))
    # llama.cpp turns Phi's sliding window off (phi3.cpp, `load_arch_hparams`)
    return {**config, "rope_parameters": rope, "original_max_position_embeddings": original, "sliding_window": None}


def phimoe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = phi3_config(model_file)
    rope = config["rope_parameters"]
    if rope["rope_type"] == "longrope":
        # transformers' PhiMoE scales cos/sin by these instead; llama.cpp by the converter's attention factor
        rope.update(short_mscale=rope["attention_factor"], long_mscale=rope["attention_factor"])
    # feed_forward_length is the expert width
    return {**config, "num_local_experts": int(model_file.require_arch("expert_count")),
            "num_experts_per_tok": int(model_file.require_arch("expert_used_count")),
            "attention_bias": True, "lm_head_bias": "output.bias" in model_file.tensors}


ARCHITECTURES = (
    Architecture("phi3", "Phi3ForCausalLM", "Phi3Config", phi3_config, ("phi3",)),
    Architecture("phimoe", "PhimoeForCausalLM", "PhimoeConfig", phimoe_config, ("phimoe",)),
)
