"""Llama 2/3.x and Mistral (`llama`), and Mixtral, which llama.cpp stores as `llama` with experts."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config


def has_experts(model_file: GGUFModelFile) -> bool:
    return bool(model_file.arch_value("expert_count"))


def mixtral_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # feed_forward_length is the expert width
    return {**common_config(model_file), "num_local_experts": int(model_file.require_arch("expert_count")),
            "num_experts_per_tok": int(model_file.require_arch("expert_used_count"))}


ARCHITECTURES = (
    Architecture("llama", "LlamaForCausalLM", "LlamaConfig", common_config, ("llama", "mistral", "llava"),
                 permute_qk=True),
    Architecture("llama", "MixtralForCausalLM", "MixtralConfig", mixtral_config, ("mixtral",), permute_qk=True,
                 applies_to=has_experts, is_variant=True),
)
