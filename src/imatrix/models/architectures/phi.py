"""Phi-3/3.5/4 (`phi3`: fused q/k/v and gate/up, LongRoPE) and Phi-3.5-MoE (`phimoe`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding, PhimoeTopKRouter

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, partial_rotary, without_sliding_window
from imatrix.models.patches import swap_class

LONG_FACTORS, SHORT_FACTORS = "rope_factors_long.weight", "rope_factors_short.weight"


def phi3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    original = int(model_file.arch_value("rope.scaling.original_context_length") or config["max_position_embeddings"])
    rope = {"rope_type": "default", "rope_theta": config.pop("rope_theta"),
            **partial_rotary(model_file, config["head_dim"])}
    if LONG_FACTORS in model_file.tensors:
        # LongRoPE: the converter stores both factor sets as tensors; llama.cpp picks the long ones when the
        # context exceeds the original one (`llama_model::get_rope_factors`), as transformers does by length
        rope.update(rope_type="longrope", original_max_position_embeddings=original,
                    factor=config["max_position_embeddings"] / original,
                    long_factor=model_file.tensor_f32(LONG_FACTORS).tolist(),
                    short_factor=model_file.tensor_f32(SHORT_FACTORS).tolist(),
                    attention_factor=float(model_file.arch_value("rope.scaling.attn_factor", 1.0)))
    # llama.cpp turns Phi's sliding window off (phi3.cpp, `load_arch_hparams`)
    return {**config, "rope_parameters": rope, "original_max_position_embeddings": original, "sliding_window": None}


def phimoe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = phi3_config(model_file)
    rope = config["rope_parameters"]
    if rope["rope_type"] == "longrope":  # the config requires them; the rotary embedding runs as Phi-3's (below)
        rope.update(short_mscale=rope["attention_factor"], long_mscale=rope["attention_factor"])
    # feed_forward_length is the expert width
    return {**config, "num_local_experts": int(model_file.require_arch("expert_count")),
            "num_experts_per_tok": int(model_file.require_arch("expert_used_count")),
            "attention_bias": True, "lm_head_bias": "output.bias" in model_file.tensors}


# llama.cpp runs PhiMoE with Phi-3's graph (`llama_model_phimoe::graph` is phi3.cpp's), which differs from
# transformers' PhiMoE in three modules; these classes compute what that graph does.


class RMSNormWithBias(torch.nn.LayerNorm):
    """phi3.cpp's norms are RMS norms (plus the bias), not the LayerNorms of the checkpoint."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden_states.float(), self.normalized_shape, self.weight.float(), self.eps)
        return (normed + self.bias.float()).to(hidden_states.dtype)


class SoftmaxTopKRouter(PhimoeTopKRouter):
    """phi3.cpp routes with softmax top-k weights renormalised to sum 1 (`build_moe_ffn`, norm_w), not with
    sparsemixer's; the experts chosen are the same top k."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)
        weights, experts = torch.softmax(router_logits.float(), dim=-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return router_logits, weights.to(hidden_states.dtype), experts


def run_as_phi3(model: torch.nn.Module) -> None:
    """Switch PhiMoE's norms, routers and rotary embedding to Phi-3's computation (class swaps: the
    parameters stay). Phi-3's rotary embedding picks the long LongRoPE factors past the original context
    and scales by the converter's attention factor, as llama.cpp does (PhiMoE's always takes the short ones)."""
    for module in model.modules():
        if type(module) is torch.nn.LayerNorm:
            swap_class(module, RMSNormWithBias)
        elif type(module) is PhimoeTopKRouter:
            swap_class(module, SoftmaxTopKRouter)
        elif type(module) is PhimoeRotaryEmbedding:
            swap_class(module, Phi3RotaryEmbedding)


ARCHITECTURES = (
    Architecture("phi3", "Phi3ForCausalLM", "Phi3Config", phi3_config, ("phi3",), hf_overrides=without_sliding_window),
    Architecture("phimoe", "PhimoeForCausalLM", "PhimoeConfig", phimoe_config, ("phimoe",),
                 hf_overrides=without_sliding_window, graph_fixes=run_as_phi3),
)
