"""StarCoder 2 (`starcoder2`): LayerNorms with bias, biased q/k/v/o, a plain GELU MLP with biases."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config


def starcoder2_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp's graph has no sliding window for starcoder2, and requires every bias
    return {**common_config(model_file), "norm_epsilon": float(model_file.require_arch("attention.layer_norm_epsilon")),
            "use_bias": True, "sliding_window": None}


ARCHITECTURES = (
    Architecture("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", starcoder2_config, ("starcoder2",)),
)
