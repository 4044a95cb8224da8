"""Ministral 3 (`mistral3`: llama with YaRN and Llama 4's attention temperature), the text model of
Mistral 3; the converter permutes q/k rows as for llama."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import (
    Architecture,
    Config,
    common_config,
    rope_parameters,
    without_sliding_window,
)


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


def as_mistral3_runs(config: Config) -> dict[str, Any]:
    """A Mistral Small 3 checkpoint's text model (`mistral`, no temperature) runs as Ministral 3 with none, as
    llama.cpp runs the `mistral3` file converted from it."""
    rope = {"llama_4_scaling_beta": 0.0, "original_max_position_embeddings": config.max_position_embeddings,
            **config.rope_parameters}
    return {**without_sliding_window(config), "rope_parameters": rope}


ARCHITECTURES = (
    # "mistral3": Mistral 3's multimodal checkpoints (Ministral 3, Mistral Small 3.1/3.2), converted as `mistral3`
    Architecture("mistral3", "Ministral3ForCausalLM", "Ministral3Config", ministral3_config, ("ministral3", "mistral3"),
                 permute_qk=True, hf_overrides=as_mistral3_runs),
)
