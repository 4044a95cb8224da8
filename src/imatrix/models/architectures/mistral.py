"""Ministral 3 (`mistral3`: llama with YaRN and Llama 4's attention temperature), the text model of
Mistral 3; the converter permutes q/k rows as for llama."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, rope_parameters, without_sliding_window


def ministral3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    for key in ("rope_theta", "rope_scaling"):  # stated in `rope_parameters`
        config.pop(key, None)
    rope = rope_parameters(model_file)
    log_multiplier = model_file.arch_value("rope.scaling.yarn_log_multiplier")
    if log_multiplier:  # llama.cpp then takes mscale as 1 and the multiplier as mscale_all_dim (llama-context.cpp)
        rope.update(mscale=1.0, mscale_all_dim=float(log_multiplier))
    # Llama 4's attention temperature over the original context (mistral3.cpp); 0 leaves the queries as they are
    rope["llama_4_scaling_beta"] = float(model_file.arch_value("attention.temperature_scale", 0.0))
    rope.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return {**config, "rope_parameters": rope, "sliding_window": None}


ARCHITECTURES = (
    Architecture("mistral3", "Ministral3ForCausalLM", "Ministral3Config", ministral3_config, ("ministral3",),
                 permute_qk=True, hf_overrides=without_sliding_window),
)
