"""Gemma 1, 2, 3, 3n and 4 (text).

All Gemmas scale the token embeddings by √hidden (transformers' scaled embedding module); Gemma 1-3
keep zero-centred RMS norms, which the converter stores as `1 + w`. llama.cpp reads the layout from the
file in its own way, and fixes some of it in code (`src/models/gemma*.cpp`): the config built here
states that reading, so that transformers' forward runs llama.cpp's graph.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import (
    Architecture,
    Config,
    Stacked,
    TensorRule,
    common_config,
    minus_one,
    per_layer,
    periodic_layer_types,
    rope_config,
    routed_experts,
    sliding_layer_types,
    soft_capped_logits,
)
from imatrix.models.experts import StackJoin

# every RMS norm of Gemma 1-3 is stored as 1 + w (`modify_tensors` of the converter's Gemma classes)
ZERO_CENTRED_NORMS = (TensorRule(r"norm\.weight$", minus_one),)
# the layer count of the 27B models, whose queries llama.cpp scales by hidden/heads, not by head size
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def query_pre_attn_scalar(architecture: str, n_layer: int, hidden: int, n_head: int, head_dim: int) -> int:
    """llama.cpp ignores `query_pre_attn_scalar`: it scales queries by 1/√head_dim, except for the 27B
    models (known by their layer count), where it uses hidden/heads (`load_arch_hparams`, gemma2/gemma3)."""
    return hidden // n_head if n_layer == GEMMA_27B_LAYERS[architecture] else head_dim


def query_scale_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    return {"query_pre_attn_scalar": query_pre_attn_scalar(model_file.architecture, config["num_hidden_layers"],
                                                           config["hidden_size"], config["num_attention_heads"],
                                                           config["head_dim"])}


def gemma_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp multiplies by the token embeddings whatever else the file holds (gemma.cpp, gemma2.cpp)
    return {**common_config(model_file), "tie_word_embeddings": True}


def gemma2_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp's defaults when the file states none (llama-hparams.h, gemma2.cpp)
    return {**gemma_config(model_file), **query_scale_config(model_file),
            "sliding_window": int(model_file.arch_value("attention.sliding_window", 4096)),
            "layer_types": sliding_layer_types(model_file, 2),
            "attn_logit_softcapping": float(model_file.arch_value("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(model_file.arch_value("final_logit_softcapping", 30.0))}


def gemma3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = {**common_config(model_file), **query_scale_config(model_file),
              "final_logit_softcapping": model_file.arch_value("final_logit_softcapping") or None,
              "rope_parameters": gemma3_rope(model_file)}
    del config["rope_theta"]
    window = model_file.arch_value("attention.sliding_window") or 0
    if window:
        return {**config, "sliding_window": int(window), "layer_types": sliding_layer_types(model_file, 6)}
    return {**config, "layer_types": ["full_attention"] * config["num_hidden_layers"]}


def gemma3_rope(model_file: GGUFModelFile) -> dict[str, dict[str, Any]]:
    """Global layers: the file's theta and scaling; local ones: their own theta (llama.cpp's default
    10000), never scaled (`llama_model::get_rope_freq_base`/`get_rope_freq_scale`)."""
    full = rope_config(model_file)
    scaling = full.get("rope_scaling") or {"rope_type": "default"}
    local_theta = float(model_file.arch_value("rope.freq_base_swa", 10000.0))
    return {"full_attention": {**scaling, "rope_theta": full["rope_theta"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}


# gemma3n.cpp fixes these instead of reading them from the file: AltUp streams (the first one active), the
# Laurel rank, the per-layer input width, the layers with KV of their own, the layers with activation
# sparsity and its cutoff in standard deviations (normal icdf(0.95)), the final soft-cap
GEMMA3N_FIXED = {"altup_num_inputs": 4, "altup_active_idx": 0, "laurel_rank": 64, "hidden_size_per_layer_input": 256,
                 "final_logit_softcapping": 30.0}
GEMMA3N_KV_LAYERS, GEMMA3N_SPARSE_LAYERS, GEMMA3N_STD_MULTIPLIER = 20, 10, 1.6448533535003662


def gemma3n_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = {**common_config(model_file), **GEMMA3N_FIXED, "rope_parameters": gemma3_rope(model_file)}
    del config["rope_theta"]
    n_layer = config["num_hidden_layers"]
    widths = per_layer(model_file.require_arch("feed_forward_length"), n_layer)
    return {**config, "intermediate_size": widths, "vocab_size_per_layer_input": config["vocab_size"],
            "sliding_window": int(model_file.require_arch("attention.sliding_window")),
            "layer_types": sliding_layer_types(model_file, 5),
            "num_kv_shared_layers": max(0, n_layer - GEMMA3N_KV_LAYERS),
            "activation_sparsity_pattern": gemma3n_sparsity(widths)}


def gemma3n_sparsity(widths: list[int]) -> list[float]:
    """llama.cpp sparsifies the gate of the first 10 layers whatever the config says (`n_layer_sparsity`)."""
    return [sparsity_at_llama_cpp_cutoff(width) if layer < GEMMA3N_SPARSE_LAYERS else 0.0
            for layer, width in enumerate(widths)]


def sparsity_at_llama_cpp_cutoff(n_ff: int) -> float:
    """The target sparsity that puts transformers' gate cutoff where llama.cpp puts it.

    Both cut the gate at mean + k·std; llama.cpp (`gaussian_topk`, gemma3n.cpp) with k = icdf(0.95) and the
    sample std (n − 1), transformers with k = icdf(sparsity) and the population std: the same cutoff for
    k = icdf(0.95)·√(n / (n − 1)), which matters for narrow test models only."""
    return NormalDist().cdf(GEMMA3N_STD_MULTIPLIER * math.sqrt(n_ff / (n_ff - 1)))


# the AltUp projections of the embeddings and of the output, one GGUF tensor each (`Gemma3NModel.modify_tensors`)
ALTUP_STACKS = (Stacked(r"model\.altup_projections\.(\d+)\.weight", "altup_proj.weight"),
                Stacked(r"model\.altup_unembed_projections\.(\d+)\.weight", "altup_unembd_proj.weight"))

# a bare parameter, which the converter names `….weight` (`Gemma3NModel.filter_tensors`)
ALTUP_SCALE = ((r"model\.layers\.(\d+)\.altup\.correct_output_scale", r"blk.\1.altup_correct_scale.weight"),)


def gemma4_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = {**common_config(model_file), "rope_parameters": gemma4_rope(model_file)}
    del config["rope_theta"]
    layer_types = sliding_layer_types(model_file, 0)
    # llama.cpp's default soft-cap stays when the file states none (gemma4.cpp reads the key only if present)
    return {**config, **gemma4_attention(model_file, layer_types), **gemma4_feed_forward(model_file),
            **gemma4_per_layer_input(model_file, config["vocab_size"]), **gemma4_experts(model_file),
            "final_logit_softcapping": float(model_file.arch_value("final_logit_softcapping", 30.0))}


def gemma4_attention(model_file: GGUFModelFile, layer_types: list[str]) -> dict[str, Any]:
    """The file states head sizes for full-attention layers (`key_length`) and sliding ones (`key_length_swa`),
    and KV heads per layer; transformers takes the full-attention layers' as per-layer overrides."""
    n_layer = len(layer_types)
    first_full = layer_types.index("full_attention")
    first_sliding = layer_types.index("sliding_attention") if "sliding_attention" in layer_types else first_full
    kv_heads = per_layer(model_file.arch_value("attention.head_count_kv", 0) or
                         model_file.require_arch("attention.head_count"), n_layer)
    full_head = int(model_file.require_arch("attention.key_length"))
    full_layer = {"head_dim": full_head, "num_key_value_heads": kv_heads[first_full]}
    full_layers = {layer: full_layer for layer, kind in enumerate(layer_types) if kind == "full_attention"}
    return {"layer_types": layer_types, "sliding_window": int(model_file.require_arch("attention.sliding_window")),
            "head_dim": int(model_file.arch_value("attention.key_length_swa", full_head)),
            "num_key_value_heads": kv_heads[first_sliding],
            "per_layer_config": full_layers,
            # full-attention layers without a value projection use the keys as values
            "attention_k_eq_v": f"blk.{first_full}.attn_v.weight" not in model_file.tensors,
            "num_kv_shared_layers": int(model_file.arch_value("attention.shared_kv_layers", 0))}


def gemma4_feed_forward(model_file: GGUFModelFile) -> dict[str, Any]:
    """Per-layer FFN widths: the KV-sharing layers' are twice the others' with `use_double_wide_mlp`."""
    widths = per_layer(model_file.require_arch("feed_forward_length"), int(model_file.require_arch("block_count")))
    return {"intermediate_size": widths[0], "use_double_wide_mlp": widths[-1] == 2 * widths[0]}


def gemma4_per_layer_input(model_file: GGUFModelFile, vocab_size: int) -> dict[str, Any]:
    width = int(model_file.arch_value("embedding_length_per_layer_input", 0) or 0)
    return {"hidden_size_per_layer_input": width, "vocab_size_per_layer_input": vocab_size}


def gemma4_experts(model_file: GGUFModelFile) -> dict[str, Any]:
    if not model_file.arch_value("expert_count"):
        return {"enable_moe_block": False}
    return {"enable_moe_block": True, **routed_experts(model_file, count="num_experts", used="top_k_experts")}


def gemma4_rope(model_file: GGUFModelFile) -> dict[str, dict[str, Any]]:
    """Full-attention layers rotate part of each head ("proportional" RoPE): the converter states it as
    `rope_freqs` factors, 1 for the rotated frequencies and 1e30 (no rotation) for the rest."""
    rotated = 1.0
    if "rope_freqs.weight" in model_file.tensors:
        factors = model_file.tensor_f32("rope_freqs.weight").reshape(-1)
        rotated = float((factors < 2.0).sum()) / factors.size
    return {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": rotated,
                               "rope_theta": float(model_file.arch_value("rope.freq_base", 10000.0))},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(model_file.arch_value("rope.freq_base_swa", 10000.0))}}


# bare parameters and buffers, which the converter names `….weight`, or renames (`Gemma4Model.modify_tensors`)
GEMMA4_NAMES = ((r"model\.layers\.(\d+)\.layer_scalar", r"blk.\1.layer_output_scale.weight"),
                (r"model\.layers\.(\d+)\.router\.scale", r"blk.\1.ffn_gate_inp.scale"),
                (r"model\.layers\.(\d+)\.router\.per_expert_scale", r"blk.\1.ffn_down_exps.scale"))

# --- checkpoint directories: what llama.cpp's graph fixes whatever their config says ----------------------------
# (its GELU is always the tanh approximation; transformers' Gemma 1 config maps "gelu" to it already)

def gemma2_overrides(config: Config) -> dict[str, Any]:
    return {**sliding_overrides(config, "gemma2", 2), "hidden_activation": "gelu_pytorch_tanh"}


def gemma3_overrides(config: Config) -> dict[str, Any]:
    return {**sliding_overrides(config, "gemma3", 6), "hidden_activation": "gelu_pytorch_tanh"}


def sliding_overrides(config: Config, architecture: str, period: int) -> dict[str, Any]:
    """The query scale and the window pattern llama.cpp fixes for Gemma 2/3 (the converter writes neither)."""
    scalar = query_pre_attn_scalar(architecture, config.num_hidden_layers, config.hidden_size,
                                   config.num_attention_heads, config.head_dim)
    return {"query_pre_attn_scalar": scalar, "layer_types": periodic_layer_types(config.num_hidden_layers, period)}


def gemma3n_overrides(config: Config) -> dict[str, Any]:
    fixed = {key: value for key, value in GEMMA3N_FIXED.items() if key == "final_logit_softcapping"}
    return {**fixed, "hidden_activation": "gelu_pytorch_tanh",
            "num_kv_shared_layers": max(0, config.num_hidden_layers - GEMMA3N_KV_LAYERS),
            "activation_sparsity_pattern": gemma3n_sparsity(config.intermediate_size)}


def gemma4_overrides(config: Config) -> dict[str, Any]:
    return {"final_logit_softcapping": config.final_logit_softcapping or 30.0, "hidden_activation": "gelu_pytorch_tanh"}


ARCHITECTURES = (
    Architecture("gemma", "GemmaForCausalLM", "GemmaConfig", gemma_config, ("gemma",),
                 tensor_rules=ZERO_CENTRED_NORMS),
    Architecture("gemma2", "Gemma2ForCausalLM", "Gemma2Config", gemma2_config, ("gemma2",),
                 tensor_rules=ZERO_CENTRED_NORMS, logits=soft_capped_logits, hf_overrides=gemma2_overrides),
    Architecture("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", gemma3_config, ("gemma3_text", "gemma3"),
                 tensor_rules=ZERO_CENTRED_NORMS, logits=soft_capped_logits, hf_overrides=gemma3_overrides),
    Architecture("gemma3n", "Gemma3nForCausalLM", "Gemma3nTextConfig", gemma3n_config, ("gemma3n_text", "gemma3n"),
                 stacked=ALTUP_STACKS, extra_names=ALTUP_SCALE, logits=soft_capped_logits,
                 hf_overrides=gemma3n_overrides),
    Architecture("gemma4", "Gemma4ForCausalLM", "Gemma4TextConfig", gemma4_config, ("gemma4_text", "gemma4"),
                 extra_names=GEMMA4_NAMES, expert_join=StackJoin(fused_gate_up=True), logits=soft_capped_logits,
                 hf_overrides=gemma4_overrides),
)
