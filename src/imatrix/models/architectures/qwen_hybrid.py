"""Qwen3-Next and Qwen3.5 (dense and MoE): Gated DeltaNet linear-attention layers, with full attention
on some layers (`layer_types`).

What llama.cpp's converter (`conversion/qwen.py`) does to these checkpoints, undone here:
- norms stored as `1 + w`, except the gated norm of the linear attention (`ssm_norm`);
- `A_log` stored as `ssm_a = -exp(A_log)`, `dt_bias` as `ssm_dt.bias`, the conv1d kernel squeezed;
- Qwen3-Next: `in_proj_qkvz` (q, k, v, z interleaved per key head) split into `attn_qkv` and `attn_gate`;
- Qwen3.5: value heads reordered from grouped by key head to tiled, in every tensor with a row per value
  head or value element, and in the columns of `ssm_out`, whose input llama.cpp therefore sees tiled.
The value-head reorder is transformers' own (its GGUF loading tables for qwen35).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.integrations.gguf.gguf_conversion_mapping import TiledToGroupedInputs, TiledToGroupedRows

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import (
    Architecture,
    ColumnOrder,
    Config,
    Fused,
    TensorRule,
    common_config,
    minus_one,
    routed_experts,
)

# --- metadata -> config -------------------------------------------------------------------------------------

def hybrid_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    value_heads = int(model_file.require_arch("ssm.time_step_rank"))
    rope = {"rope_type": "default", **config.pop("rope_scaling", {}), "rope_theta": config.pop("rope_theta"),
            "partial_rotary_factor": int(model_file.require_arch("rope.dimension_count")) / config["head_dim"]}
    return {**config, "rope_parameters": rope, "layer_types": layer_types(model_file, config["num_hidden_layers"]),
            "linear_conv_kernel_dim": int(model_file.require_arch("ssm.conv_kernel")),
            "linear_key_head_dim": int(model_file.require_arch("ssm.state_size")),
            "linear_num_key_heads": int(model_file.require_arch("ssm.group_count")),
            "linear_num_value_heads": value_heads,
            "linear_value_head_dim": int(model_file.require_arch("ssm.inner_size")) // value_heads}


def layer_types(model_file: GGUFModelFile, n_layer: int) -> list[str]:
    """Which layers are linear attention, as llama.cpp's `load_arch_hparams` reads it: the per-layer
    `attention.recurrent_layers` flags, else every `full_attention_interval`-th layer is full attention."""
    recurrent = model_file.arch_value("attention.recurrent_layers")
    if recurrent is None:
        interval = int(model_file.arch_value("full_attention_interval", 4))
        recurrent = [(layer + 1) % interval != 0 for layer in range(n_layer)]
    return ["linear_attention" if flag else "full_attention" for flag in recurrent[:n_layer]]


def qwen3next_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp's graph renormalises the top-k weights (build_moe_ffn with norm_w = true)
    return {**hybrid_config(model_file), **moe_config(model_file), "norm_topk_prob": True}


def qwen35_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = hybrid_config(model_file)
    # llama.cpp gives a text token one position on the t, h and w axes: with sections covering the rotary
    # dimensions, M-RoPE is plain RoPE there, as in transformers
    sections = [int(n) for n in model_file.require_arch("rope.dimension_sections") if n]
    return {**config, "rope_parameters": {**config["rope_parameters"], "mrope_section": sections,
                                          "mrope_interleaved": True}}


def qwen35moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    return {**qwen35_config(model_file), **moe_config(model_file)}


def moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    experts = routed_experts(model_file)
    shared = model_file.arch_value("expert_shared_feed_forward_length") or experts["moe_intermediate_size"]
    return {**experts, "shared_expert_intermediate_size": int(shared), "decoder_sparse_step": 1, "mlp_only_layers": []}


# --- tensors --------------------------------------------------------------------------------------------------

def a_log(values: np.ndarray, config: Config, name: str) -> np.ndarray:
    """The converter stores `ssm_a = -exp(A_log)`."""
    return np.log(-values.astype(np.float32))


def unsqueeze_kernel(values: np.ndarray, config: Config, name: str) -> np.ndarray:
    """The converter squeezes the depthwise conv1d kernel `[channels, 1, width]` to `[channels, width]`."""
    return values[:, None, :]


def interleave_qkvz(parts: list[np.ndarray], config: Config) -> np.ndarray:
    """Qwen3-Next's `in_proj_qkvz` rows: q, k, v, z of key head 0, then of key head 1, … (the converter
    stores all q, k and v rows as `attn_qkv` and the z rows as `attn_gate`)."""
    qkv, z = parts
    n_key_heads = config.linear_num_key_heads
    key_dim = n_key_heads * config.linear_key_head_dim
    q, k, v = np.split(qkv, [key_dim, 2 * key_dim])
    per_head = [part.reshape(n_key_heads, -1, part.shape[-1]) for part in (q, k, v, z)]
    return np.concatenate(per_head, axis=1).reshape(-1, qkv.shape[-1])


def _heads(config: Config) -> tuple[int, int]:
    """Key heads, and value heads per key head."""
    return config.linear_num_key_heads, config.linear_num_value_heads // config.linear_num_key_heads


# GGUF tensors of Qwen3.5's linear attention with value-head rows: (rows per value head?, q and k rows first?)
_VALUE_HEAD_ROWS = {"attn_qkv": (True, True), "ssm_conv1d": (True, True), "attn_gate": (True, False),
                    "ssm_beta": (False, False), "ssm_alpha": (False, False), "ssm_a": (False, False),
                    "ssm_dt": (False, False)}


def group_value_heads(values: np.ndarray, config: Config, name: str) -> np.ndarray:
    """Value-head rows back from tiled to grouped by key head (the converter's `_reorder_v_heads`)."""
    per_element, qk_first = _VALUE_HEAD_ROWS[name.split(".")[2]]
    rows_per_head = config.linear_value_head_dim if per_element else 1
    skip = 2 * config.linear_num_key_heads * config.linear_key_head_dim if qk_first else 0
    order = TiledToGroupedRows(*_heads(config), rows_per_head).permutation.numpy()
    return np.concatenate([values[:skip], values[skip:][order]])


def tiled_value_columns(config: Config) -> np.ndarray:
    """`ssm_out`'s columns in the file: the value elements with the heads tiled."""
    return TiledToGroupedInputs(*_heads(config), config.linear_value_head_dim).input_permutation.numpy()


def has_joint_qkvz(model_file: GGUFModelFile) -> bool:
    """Files from converters before the split of `in_proj_qkvz` hold it unchanged, as `ssm_in`."""
    return any(name.endswith(".ssm_in.weight") for name in model_file.tensors)


_RULES = (
    TensorRule(r"(?<!ssm_)norm\.weight$", minus_one),  # the gated norm of the linear attention is not offset
    TensorRule(r"\.ssm_a$", a_log),
    TensorRule(r"\.ssm_conv1d\.weight$", unsqueeze_kernel),
)
_DT_BIAS = (r"model\.layers\.(\d+)\.linear_attn\.dt_bias", r"blk.\1.ssm_dt.bias")
_QWEN3NEXT = {"gguf_name": "qwen3next", "model_class": "Qwen3NextForCausalLM", "config_class": "Qwen3NextConfig",
              "config_from_gguf": qwen3next_config, "tensor_rules": _RULES, "extra_names": (_DT_BIAS,)}
_QWEN35 = {
    "tensor_rules": (*_RULES, TensorRule(rf"\.({'|'.join(_VALUE_HEAD_ROWS)})\.|\.ssm_a$", group_value_heads)),
    "column_orders": (ColumnOrder(r"\.ssm_out\.weight$", tiled_value_columns),),
    "extra_names": (_DT_BIAS,),
}

ARCHITECTURES = (
    Architecture(**_QWEN3NEXT, hf_model_types=("qwen3_next",),
                 fused=(Fused("linear_attn.in_proj_qkvz", ("attn_qkv", "attn_gate"), interleave_qkvz),)),
    Architecture(**_QWEN3NEXT, applies_to=has_joint_qkvz, is_variant=True),
    Architecture("qwen35", "Qwen3_5ForCausalLM", "Qwen3_5TextConfig", qwen35_config, ("qwen3_5_text", "qwen3_5"),
                 **_QWEN35),
    Architecture("qwen35moe", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", qwen35moe_config,
                 ("qwen3_5_moe_text", "qwen3_5_moe"), **_QWEN35),
)
