"""MiniMax-M2 (`minimax-m2`: q/k norms over all heads, partial rotary, sigmoid routing with a selection bias)."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, partial_rotary, routed_experts


def minimax_m2_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # transformers routes as llama.cpp's minimax-m2 graph does (sigmoid, biased selection, renormalised top-k)
    config = common_config(model_file)
    experts = routed_experts(model_file, count="num_local_experts", width="intermediate_size")
    return {**config, **experts, **partial_rotary(model_file, config["head_dim"])}


ARCHITECTURES = (
    Architecture("minimax-m2", "MiniMaxM2ForCausalLM", "MiniMaxM2Config", minimax_m2_config, ("minimax_m2",)),
)
