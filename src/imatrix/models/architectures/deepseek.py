"""DeepSeek V2 and V3 (`deepseek2`: multi-head latent attention, shared and routed experts, dense first layers).

llama.cpp stores the attention the way its graph runs it, absorbed: `kv_b_proj` split into `attn_k_b`
and `attn_v_b`, one matrix per head (the converter's `DeepseekV2Model.modify_tensors`), with the latent
keys as a single KV head. Those two weights multiply values transformers' forward hands to no module;
`models.latent_attention` measures them. Files converted before that split keep `attn_kv_b`, which
llama.cpp multiplies as the checkpoint does (on the normed latents).

V3 scores experts with a sigmoid (`DeepseekV3ForCausalLM` routes as llama.cpp does); V2, V2-Lite and V2.5
with a softmax, which their files state or leave to llama.cpp's default. Those run as `DeepseekV2ForCausalLM`
with llama.cpp's expert choice (`LlamaCppSoftmaxRouter`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import (
    Architecture,
    Config,
    Fused,
    common_config,
    n_trunk_layers,
    rope_parameters,
    routed_experts,
)
from imatrix.models.latent_attention import LatentAttention
from imatrix.models.patches import swap_class

# gguf-py's ExpertGatingFuncType
NO_GATING, SOFTMAX_GATING, SIGMOID_GATING = 0, 1, 2
# llama.cpp's `build_moe_ffn` keeps the renormalising sum at least F16's smallest normal number
F16_SMALLEST_NORMAL = 6.103515625e-5


def expert_gating(model_file: GGUFModelFile) -> int:
    """How llama.cpp scores a file's experts (`llama_model_deepseek2::load_arch_hparams`): as the file states;
    without a statement (DeepSeek V2 and V2.5 files predate the key) with a softmax, but for GLM-4.7 Lite's
    shape (47 or 48 layers, 154880 tokens), which it takes for a sigmoid."""
    gating = int(model_file.arch_value("expert_gating_func", NO_GATING))
    if gating != NO_GATING:
        return gating
    n_vocab = model_file.arch_value("vocab_size") or len(model_file.get("tokenizer.ggml.tokens", ()))
    glm_lite = n_trunk_layers(model_file) in (47, 48) and n_vocab == 154880
    return SIGMOID_GATING if glm_lite else SOFTMAX_GATING


def scores_with_softmax(model_file: GGUFModelFile) -> bool:
    return bool(model_file.arch_value("expert_count")) and expert_gating(model_file) == SOFTMAX_GATING


def deepseek_v3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    if model_file.arch_value("expert_count") and expert_gating(model_file) != SIGMOID_GATING:
        raise ImatrixError(f"{model_file.path}: expert gating function {expert_gating(model_file)} is not supported "
                           "for deepseek2 (sigmoid and softmax are)")
    return {**deepseek_v2_config(model_file), "rope_interleave": True}  # llama.cpp rotates adjacent pairs (NORM)


def deepseek_v2_config(model_file: GGUFModelFile) -> dict[str, Any]:
    """The config both classes read (V2's rotates adjacent pairs, as llama.cpp's rope type NORM does)."""
    config = {**common_config(model_file), **mla_config(model_file), **routing_config(model_file),
              **routed_experts(model_file, count="n_routed_experts")}
    for key in ("rope_theta", "rope_scaling", "head_dim"):  # stated by `mla_config`
        config.pop(key, None)
    return config


def mla_config(model_file: GGUFModelFile) -> dict[str, Any]:
    """The attention's sizes. The file states MLA as one KV head of kv_lora_rank + rope width, and the
    per-head sizes apart (`*_mla`; files from before the split have only the latter)."""
    n_rope = int(model_file.require_arch("rope.dimension_count"))
    key_length = model_file.arch_value("attention.key_length_mla") or model_file.require_arch("attention.key_length")
    value_length = (model_file.arch_value("attention.value_length_mla")
                    or model_file.require_arch("attention.value_length"))
    q_lora_rank = model_file.arch_value("attention.q_lora_rank")  # none: V2-Lite's plain `attn_q`
    return {"num_key_value_heads": int(model_file.require_arch("attention.head_count")),
            "q_lora_rank": int(q_lora_rank) if q_lora_rank else None,
            "kv_lora_rank": int(model_file.require_arch("attention.kv_lora_rank")),
            "qk_rope_head_dim": n_rope, "qk_nope_head_dim": int(key_length) - n_rope, "v_head_dim": int(value_length),
            "rope_parameters": llama_cpp_yarn(rope_parameters(model_file), stored_mscale_all_dim(model_file))}


def stored_mscale_all_dim(model_file: GGUFModelFile) -> float:
    """The converter stores 0.1 · mscale_all_dim as the log multiplier (`TAG_DEEPSEEK2_YARN_LOG_MUL_FIX`)."""
    return float(model_file.arch_value("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1


def llama_cpp_yarn(parameters: dict[str, Any], mscale_all_dim: float | None) -> dict[str, Any]:
    """DeepSeek's YaRN scales the attention logits by yarn_get_mscale(mscale_all_dim)² as well; llama.cpp takes
    the checkpoint's `mscale` to be `mscale_all_dim` (`llama_context` constructor), and without one (or 0) scales
    the logits by yarn_get_mscale(1)² on top of the rotary scaling (`deepseek2.cpp`'s kq_scale)."""
    if parameters.get("rope_type") != "yarn":
        return parameters
    if not mscale_all_dim:
        return {**{key: value for key, value in parameters.items() if key != "mscale"}, "mscale_all_dim": 1.0}
    return {**parameters, "mscale": mscale_all_dim, "mscale_all_dim": mscale_all_dim}


def llama_cpp_rope(config: Config) -> dict[str, Any]:
    """What llama.cpp's graph does whatever a checkpoint's config says (see `mla_config`)."""
    rope = config.rope_parameters
    if rope.get("rope_type") == "yarn":  # whole-dimension ramps, as `base.rope_parameters` says
        rope = llama_cpp_yarn({**rope, "truncate": True}, rope.get("mscale_all_dim"))
    return {"rope_parameters": rope}


def as_llama_cpp_runs_v3(config: Config) -> dict[str, Any]:
    return {**llama_cpp_rope(config), "rope_interleave": True}


def routing_config(model_file: GGUFModelFile) -> dict[str, Any]:
    """llama.cpp's `build_moe_ffn` as the file configures it: top-k renormalised or not, scaled, group-limited."""
    return {"n_shared_experts": int(model_file.arch_value("expert_shared_count", 0)),
            "first_k_dense_replace": int(model_file.arch_value("leading_dense_block_count", 0)),
            "norm_topk_prob": bool(model_file.arch_value("expert_weights_norm", False)),
            "routed_scaling_factor": float(model_file.arch_value("expert_weights_scale", 0.0) or 1.0),
            "n_group": int(model_file.arch_value("expert_group_count", 0) or 1),
            "topk_group": int(model_file.arch_value("expert_group_used_count", 0) or 1)}


class LlamaCppSoftmaxRouter(DeepseekV2TopkRouter):
    """deepseek2's expert choice for softmax scores as llama.cpp's `build_moe_ffn` makes it: where the model has
    expert groups (whatever `topk_method` says), each token's best groups by the sum of their two best scores
    (transformers' V2 router ranks them by the best one); the chosen scores renormalised where the model says so
    (which that router never does), then scaled."""

    norm_topk_prob = False  # the model's `norm_topk_prob`, set by `route_as_llama_cpp`

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states.view(-1, self.hidden_dim).float(), self.weight.float())
        scores = router_logits.softmax(dim=-1)
        choice = in_best_groups(scores, self.num_group or 1, self.topk_group or 1)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=F16_SMALLEST_NORMAL)
        return router_logits, weights * self.routed_scaling_factor, experts


def in_best_groups(scores: torch.Tensor, n_group: int, n_group_used: int) -> torch.Tensor:
    """`scores` `[n_tokens, n_expert]` with every expert outside its token's `n_group_used` best groups at -inf."""
    if n_group <= 1:
        return scores
    groups = scores.unflatten(-1, (n_group, -1))
    best = groups.topk(2, dim=-1).values.sum(dim=-1).topk(n_group_used, dim=-1).indices
    chosen = torch.zeros(groups.shape[:-1], dtype=torch.bool, device=scores.device).scatter_(-1, best, True)
    return groups.masked_fill(~chosen.unsqueeze(-1), float("-inf")).flatten(-2)


def route_as_llama_cpp(model: torch.nn.Module) -> None:
    """Switch DeepSeek-V2's routers to llama.cpp's choice (`LlamaCppSoftmaxRouter`; a class swap)."""
    for module in model.modules():
        if type(module) is DeepseekV2TopkRouter:
            swap_class(module, LlamaCppSoftmaxRouter)
            module.norm_topk_prob = bool(model.config.norm_topk_prob)


def has_unsplit_kv_b(model_file: GGUFModelFile) -> bool:
    """Files converted before the split: llama.cpp runs them without absorption, `attn_kv_b` on the latents."""
    return "blk.0.attn_kv_b.weight" in model_file.tensors


def join_kv_b(parts: list[np.ndarray], config: Config) -> np.ndarray:
    """`kv_b_proj` from `attn_k_b` `[n_head, kv_lora_rank, qk_nope]` and `attn_v_b` `[n_head, v_head_dim,
    kv_lora_rank]`: per head, the key rows then the value rows."""
    k_b, v_b = parts
    return np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).reshape(-1, config.kv_lora_rank)


ABSORBED = {"fused": (Fused("kv_b_proj", ("attn_k_b", "attn_v_b"), join_kv_b),), "observers": (LatentAttention(),)}
V3 = ("DeepseekV3ForCausalLM", "DeepseekV3Config", deepseek_v3_config)
V2 = ("DeepseekV2ForCausalLM", "DeepseekV2Config", deepseek_v2_config)

ARCHITECTURES = (
    Architecture("deepseek2", *V3, ("deepseek_v3",), hf_overrides=as_llama_cpp_runs_v3, **ABSORBED),
    Architecture("deepseek2", *V3, applies_to=lambda file: has_unsplit_kv_b(file) and not scores_with_softmax(file),
                 is_variant=True),
    Architecture("deepseek2", *V2, ("deepseek_v2",), is_variant=True, hf_overrides=llama_cpp_rope,
                 graph_fixes=route_as_llama_cpp, **ABSORBED,
                 applies_to=lambda file: scores_with_softmax(file) and not has_unsplit_kv_b(file)),
    Architecture("deepseek2", *V2, applies_to=lambda file: scores_with_softmax(file) and has_unsplit_kv_b(file),
                 is_variant=True, graph_fixes=route_as_llama_cpp),
)
