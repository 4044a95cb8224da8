"""Ministral 3 (`mistral3`: llama with YaRN and Llama 4's attention temperature), the text model of
Mistral 3; the converter permutes q/k rows as for llama."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config


def yarn_parameters(model_file: GGUFModelFile, theta: float) -> dict[str, Any]:
    """transformers' YaRN `rope_parameters` from the file, as llama.cpp's context applies them: with a
    `yarn_log_multiplier` it takes mscale as 1 and that multiplier as mscale_all_dim (llama-context.cpp)."""
    parameters = {"rope_type": "yarn", "rope_theta": theta,
                  "factor": float(model_file.require_arch("rope.scaling.factor")),
                  "original_max_position_embeddings": int(model_file.require_arch("rope.scaling.original_context_length")),
                  "beta_fast": float(model_file.arch_value("rope.scaling.yarn_beta_fast", 32.0)),
                  "beta_slow": float(model_file.arch_value("rope.scaling.yarn_beta_slow", 1.0))}
    log_multiplier = model_file.arch_value("rope.scaling.yarn_log_multiplier")
    if log_multiplier:
        parameters.update(mscale=1.0, mscale_all_dim=float(log_multiplier))
    return parameters


def ministral3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    theta = config.pop("rope_theta")
    config.pop("rope_scaling", None)
    rope = {"rope_type": "default", "rope_theta": theta}
    if model_file.arch_value("rope.scaling.type") == "yarn":
        rope = yarn_parameters(model_file, theta)
    # Llama 4's attention temperature, over the original context (mistral3.cpp): 0 leaves the queries as they are
    rope["llama_4_scaling_beta"] = float(model_file.arch_value("attention.temperature_scale", 0.0))
    rope.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return {**config, "rope_parameters": rope, "sliding_window": None}


ARCHITECTURES = (
    Architecture("mistral3", "Ministral3ForCausalLM", "Ministral3Config", ministral3_config, ("ministral3",),
                 permute_qk=True),
)
