"""Granite 4 hybrids (`granitehybrid`): Mamba2 layers with a few attention layers, routed experts beside a
shared MLP or a dense MLP alone, and Granite's multipliers (read as `granite` reads them).

The converter splits the shared MLP's `input_linear` into gate and up (the shared expert's, or with no
routed experts the layer's plain FFN), permutes q/k rows as llama's does, and stores the Mamba2 mixer
as `mamba2` says.
"""

from __future__ import annotations

from typing import Any

import transformers

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, Fused
from imatrix.models.architectures.granite import ROUTER, divided_logits, granite_config
from imatrix.models.architectures.mamba2 import MAMBA2_NAMES, MAMBA2_RULES, mamba2_config

# with no routed experts, the shared MLP is the layer's FFN
DENSE_NAMES = ((r"model\.layers\.(\d+)\.shared_mlp\.output_linear\.weight", r"blk.\1.ffn_down.weight"),)


def has_experts(model_file: GGUFModelFile) -> bool:
    return bool(model_file.arch_value("expert_count"))


def hf_has_experts(hf_config: dict[str, Any]) -> bool:
    return bool(hf_config.get("num_local_experts", transformers.GraniteMoeHybridConfig.num_local_experts))


def granite_hybrid_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = granite_config(model_file)  # Granite's multipliers included
    # a layer is a Mamba2 one where it has no KV heads (llama.cpp's `granite_hybrid::load_arch_hparams`)
    kv_heads = model_file.require_arch("attention.head_count_kv")
    experts = int(model_file.arch_value("expert_count", 0) or 0)
    return {**config, **mamba2_config(model_file),
            "layer_types": ["full_attention" if heads else "linear_attention" for heads in kv_heads],
            "mamba_expand": int(model_file.require_arch("ssm.inner_size")) // config["hidden_size"],
            # Granite switches rope off with `rope.scaling.finetuned` (on where unstated, as in llama.cpp)
            "position_embedding_type": "rope" if model_file.arch_value("rope.scaling.finetuned", True) else None,
            "num_local_experts": experts,
            "num_experts_per_tok": int(model_file.arch_value("expert_used_count", 0) or 0),
            "shared_intermediate_size": int(model_file.arch_value("expert_shared_feed_forward_length")
                                            or config["intermediate_size"])}


def granite_hybrid(fused_kinds: tuple[str, str], **fields: Any) -> Architecture:
    return Architecture("granitehybrid", "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
                        granite_hybrid_config, ("granitemoehybrid",), permute_qk=True, tensor_rules=MAMBA2_RULES,
                        fused=(Fused("shared_mlp.input_linear", fused_kinds),), logits=divided_logits, **fields)


ARCHITECTURES = (
    granite_hybrid(("ffn_gate_shexp", "ffn_up_shexp"), extra_names=MAMBA2_NAMES + ROUTER,
                   applies_to=has_experts, applies_to_hf=hf_has_experts, is_variant=True),
    granite_hybrid(("ffn_gate", "ffn_up"), extra_names=MAMBA2_NAMES + DENSE_NAMES),
)
