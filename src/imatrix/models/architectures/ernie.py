"""ERNIE 4.5 (`ernie4_5`), and its MoE (`ernie4_5-moe`: leading dense blocks, shared experts, a selection bias)."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, routed_experts


def ernie4_5_config(model_file: GGUFModelFile) -> dict[str, Any]:
    return {**common_config(model_file), "use_bias": "blk.0.attn_q.bias" in model_file.tensors}


def ernie4_5_moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = {**ernie4_5_config(model_file), **routed_experts(model_file, count="moe_num_experts", used="moe_k")}
    # llama.cpp sizes the shared experts by their total width; transformers by a count of expert widths
    shared_width = int(model_file.arch_value("expert_shared_feed_forward_length", 0) or 0)
    # llama.cpp's MoE blocks: from the first non-leading block, every `interleave_moe_layer_step`-th, to the end
    return {**config, "moe_num_shared_experts": shared_width // config["moe_intermediate_size"],
            "moe_layer_start_index": int(model_file.arch_value("leading_dense_block_count", 0) or 0),
            "moe_layer_interval": int(model_file.require_arch("interleave_moe_layer_step")),
            "moe_layer_end_index": config["num_hidden_layers"] - 1}


ARCHITECTURES = (
    Architecture("ernie4_5", "Ernie4_5ForCausalLM", "Ernie4_5Config", ernie4_5_config, ("ernie4_5",)),
    Architecture("ernie4_5-moe", "Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeConfig", ernie4_5_moe_config,
                 ("ernie4_5_moe",),
                 extra_names=((r"model\.layers\.(\d+)\.mlp\.gate\.moe_statics\.e_score_correction_bias",
                               r"blk.\1.exp_probs_b.bias"),)),
)
