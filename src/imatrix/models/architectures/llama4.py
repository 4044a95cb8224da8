"""Llama 4's text model (`llama4`): chunked attention with every 4th layer global and without rope,
q/k RMS norms, attention temperature, and MoE layers whose sigmoid router scales the experts' input."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config
from imatrix.models.experts import StackJoin

# what llama.cpp fixes rather than reads for chunked-attention Llama 4 (llama4.cpp, `load_arch_hparams`)
CHUNK_SIZE = 8192
NO_ROPE_LAYER_INTERVAL = 4
TEMPERATURE_FLOOR_SCALE, TEMPERATURE_SCALE = 8192, 0.1


def llama4_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    n_expert = int(model_file.require_arch("expert_count"))
    expert_width = model_file.require_arch("expert_feed_forward_length")
    # a sliding window of 0 (MobileLLM) means full attention everywhere, and rope on all layers but the last
    chunked = model_file.arch_value("attention.sliding_window") != 0
    return {**config, "intermediate_size": int(max(expert_width) if isinstance(expert_width, list) else expert_width),
            "intermediate_size_mlp": config["intermediate_size"], "num_local_experts": n_expert,
            "num_experts_per_tok": int(model_file.require_arch("expert_used_count")),
            "interleave_moe_layer_step": int(model_file.require_arch("interleave_moe_layer_step")),
            "use_qk_norm": n_expert != 128,  # llama.cpp turns the q/k norms off for the 128-expert model only
            "attention_chunk_size": CHUNK_SIZE if chunked else None,
            "no_rope_layer_interval": NO_ROPE_LAYER_INTERVAL if chunked else config["num_hidden_layers"],
            "attn_temperature_tuning": chunked, "floor_scale": TEMPERATURE_FLOOR_SCALE,
            "attn_scale": TEMPERATURE_SCALE}


ARCHITECTURES = (
    # the checkpoint's experts are `[n_expert, n_in, n_out]`: the converter transposed them
    Architecture("llama4", "Llama4ForCausalLM", "Llama4TextConfig", llama4_config, ("llama4_text", "llama4"),
                 expert_join=StackJoin(transposed=True)),
)
