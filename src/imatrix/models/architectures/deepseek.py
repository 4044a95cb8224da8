"""DeepSeek V3 (`deepseek2`: multi-head latent attention, shared and routed experts, dense first layers).

llama.cpp stores the attention the way its graph runs it, absorbed: `kv_b_proj` split into `attn_k_b`
and `attn_v_b`, one matrix per head (the converter's `DeepseekV2Model.modify_tensors`), with the latent
keys as a single KV head. Those two weights multiply values transformers' forward hands to no module;
`models.latent_attention` measures them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import (
    Architecture,
    Config,
    Fused,
    common_config,
    rope_parameters,
    routed_experts,
)
from imatrix.models.latent_attention import LatentAttention

# gguf-py's ExpertGatingFuncType: DeepSeek V3 scores experts with a sigmoid (V2, which the file then states
# as softmax or not at all, is another router)
SIGMOID_GATING = 2


def deepseek_v3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    if model_file.arch_value("expert_count") and model_file.arch_value("expert_gating_func") != SIGMOID_GATING:
        raise ImatrixError(f"{model_file.path}: DeepSeek-V2-style routing (softmax expert scores) is not supported "
                           "yet; DeepSeek-V3-style (sigmoid) is")
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
    q_lora_rank = model_file.arch_value("attention.q_lora_rank")
    return {"num_key_value_heads": int(model_file.require_arch("attention.head_count")),
            "q_lora_rank": int(q_lora_rank) if q_lora_rank else None,
            "kv_lora_rank": int(model_file.require_arch("attention.kv_lora_rank")),
            "qk_rope_head_dim": n_rope, "qk_nope_head_dim": int(key_length) - n_rope, "v_head_dim": int(value_length),
            "rope_interleave": True,  # llama.cpp rotates adjacent pairs (rope type NORM)
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


def as_llama_cpp_runs(config: Config) -> dict[str, Any]:
    """What llama.cpp's graph does whatever a checkpoint's config says (see `mla_config`)."""
    rope = config.rope_parameters
    if rope.get("rope_type") == "yarn":  # whole-dimension ramps, as `base.rope_parameters` says
        rope = llama_cpp_yarn({**rope, "truncate": True}, rope.get("mscale_all_dim"))
    return {"rope_interleave": True, "rope_parameters": rope}


def routing_config(model_file: GGUFModelFile) -> dict[str, Any]:
    """llama.cpp's `build_moe_ffn` as the file configures it: top-k renormalised or not, scaled, group-limited."""
    return {"n_shared_experts": int(model_file.arch_value("expert_shared_count", 0)),
            "first_k_dense_replace": int(model_file.arch_value("leading_dense_block_count", 0)),
            "norm_topk_prob": bool(model_file.arch_value("expert_weights_norm", False)),
            "routed_scaling_factor": float(model_file.arch_value("expert_weights_scale", 0.0) or 1.0),
            "n_group": int(model_file.arch_value("expert_group_count", 0) or 1),
            "topk_group": int(model_file.arch_value("expert_group_used_count", 0) or 1)}


def has_unsplit_kv_b(model_file: GGUFModelFile) -> bool:
    """Files converted before the split: llama.cpp runs them without absorption, `attn_kv_b` on the latents."""
    return "blk.0.attn_kv_b.weight" in model_file.tensors


def join_kv_b(parts: list[np.ndarray], config: Config) -> np.ndarray:
    """`kv_b_proj` from `attn_k_b` `[n_head, kv_lora_rank, qk_nope]` and `attn_v_b` `[n_head, v_head_dim,
    kv_lora_rank]`: per head, the key rows then the value rows."""
    k_b, v_b = parts
    return np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).reshape(-1, config.kv_lora_rank)


ARCHITECTURES = (
    Architecture("deepseek2", "DeepseekV3ForCausalLM", "DeepseekV3Config", deepseek_v3_config, ("deepseek_v3",),
                 fused=(Fused("kv_b_proj", ("attn_k_b", "attn_v_b"), join_kv_b),), observers=(LatentAttention(),),
                 hf_overrides=as_llama_cpp_runs),
    Architecture("deepseek2", "DeepseekV3ForCausalLM", "DeepseekV3Config", deepseek_v3_config,
                 applies_to=has_unsplit_kv_b, is_variant=True),
)
