"""OLMo 2 and 3 (`olmo2`: post-norms, q/k norms over all heads; OLMo 3 adds sliding-window layers) and OLMoE
(`olmoe`: routed experts)."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, sliding_layer_types


def has_sliding_window(model_file: GGUFModelFile) -> bool:
    return bool(model_file.arch_value("attention.sliding_window"))


def olmo3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp's olmo2 graph rotates sliding-window layers with their own base and no scaling (olmo2.cpp)
    config = common_config(model_file)
    theta, scaling = config.pop("rope_theta"), config.pop("rope_scaling", {})
    sliding_theta = float(model_file.arch_value("rope.freq_base_swa", theta))
    return {**config, "sliding_window": int(model_file.require_arch("attention.sliding_window")),
            "layer_types": sliding_layer_types(model_file, 4),
            "rope_parameters": {"full_attention": {"rope_type": "default", **scaling, "rope_theta": theta},
                                "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta}}}


def olmoe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # feed_forward_length is the expert width; llama.cpp's olmoe graph keeps the softmax top-k weights as they are
    return {**common_config(model_file), "num_experts": int(model_file.require_arch("expert_count")),
            "num_experts_per_tok": int(model_file.require_arch("expert_used_count")), "norm_topk_prob": False}


ARCHITECTURES = (
    Architecture("olmo2", "Olmo2ForCausalLM", "Olmo2Config", common_config, ("olmo2",)),
    Architecture("olmo2", "Olmo3ForCausalLM", "Olmo3Config", olmo3_config, ("olmo3",),
                 applies_to=has_sliding_window, is_variant=True),
    Architecture("olmoe", "OlmoeForCausalLM", "OlmoeConfig", olmoe_config, ("olmoe",)),
)
