"""One small adapter per architecture: GGUF metadata -> transformers config, and GGUF tensor quirks.

An adapter knows how to build the transformers config from GGUF metadata and how a GGUF tensor
differs from the checkpoint tensor (llama's q/k rows are permuted by llama.cpp's converter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import transformers

from imatrix.errors import ImatrixError
from imatrix.models.gguf_reader import GGUFModelFile


@dataclass(frozen=True)
class Architecture:
    gguf_name: str
    gguf_arch: gguf.MODEL_ARCH
    config_class: str
    model_class: str
    config_from_gguf: Callable[[GGUFModelFile], dict[str, Any]]
    hf_model_types: tuple[str, ...] = ()
    permute_qk: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)

    def build_config(self, model_file: GGUFModelFile) -> transformers.PretrainedConfig:
        config_class = getattr(transformers, self.config_class)
        return config_class(**self.config_from_gguf(model_file), **self.extra_config)

    def model_type(self) -> type:
        return getattr(transformers, self.model_class)


def _dense_config(model_file: GGUFModelFile) -> dict[str, Any]:
    n_head = int(model_file.require_arch("attention.head_count"))
    hidden = int(model_file.require_arch("embedding_length"))
    head_dim = model_file.arch_value("attention.key_length") or hidden // n_head
    return {
        "vocab_size": len(model_file.require("tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": int(model_file.arch_value("feed_forward_length", 0) or 0),
        "num_hidden_layers": int(model_file.require_arch("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(model_file.arch_value("attention.head_count_kv", n_head)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(model_file.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(model_file.arch_value("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(model_file.arch_value("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in model_file.tensors,
        "bos_token_id": model_file.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": model_file.get("tokenizer.ggml.eos_token_id"),
    }


def _routed_experts(model_file: GGUFModelFile) -> dict[str, Any]:
    n_used = int(model_file.require_arch("expert_used_count"))
    # llama.cpp falls back to feed_forward_length / n_expert_used when the GGUF has no expert size
    n_ff = (model_file.arch_value("expert_feed_forward_length")
            or model_file.require_arch("feed_forward_length") // n_used)
    return {"num_experts": int(model_file.require_arch("expert_count")), "num_experts_per_tok": n_used,
            # transformers' own GGUF loader ignores this key and builds the wrong expert size
            "moe_intermediate_size": int(n_ff), "decoder_sparse_step": 1, "mlp_only_layers": []}


def _qwen3moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp's qwen3moe graph renormalises the top-k weights (build_moe_ffn with norm_w = true)
    return {**_dense_config(model_file), **_routed_experts(model_file), "norm_topk_prob": True}


def _qwen2moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = {**_dense_config(model_file), **_routed_experts(model_file), "norm_topk_prob": False}
    shared = model_file.arch_value("expert_shared_feed_forward_length") or config["intermediate_size"]
    return {**config, "shared_expert_intermediate_size": int(shared)}


def _mixtral_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp stores Mixtral as `llama` with experts; feed_forward_length is the expert size
    config = _dense_config(model_file)
    config.update(num_local_experts=int(model_file.require_arch("expert_count")),
                  num_experts_per_tok=int(model_file.require_arch("expert_used_count")))
    return config


def _no_gguf_config(model_file: GGUFModelFile) -> dict[str, Any]:
    raise ImatrixError(f"{model_file.path}: loading '{model_file.architecture}' GGUF files is not supported "
                       "(a Hugging Face checkpoint directory of the model is)")


ARCHITECTURES: dict[str, Architecture] = {
    arch.gguf_name: arch
    for arch in (
        Architecture("llama", gguf.MODEL_ARCH.LLAMA, "LlamaConfig", "LlamaForCausalLM", _dense_config,
                     ("llama",), permute_qk=True),
        Architecture("qwen2", gguf.MODEL_ARCH.QWEN2, "Qwen2Config", "Qwen2ForCausalLM", _dense_config,
                     ("qwen2",)),
        Architecture("qwen3", gguf.MODEL_ARCH.QWEN3, "Qwen3Config", "Qwen3ForCausalLM", _dense_config,
                     ("qwen3",)),
        Architecture("qwen2moe", gguf.MODEL_ARCH.QWEN2MOE, "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                     _qwen2moe_config, ("qwen2_moe",)),
        Architecture("qwen3moe", gguf.MODEL_ARCH.QWEN3MOE, "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                     _qwen3moe_config, ("qwen3_moe",)),
        Architecture("deepseek2", gguf.MODEL_ARCH.DEEPSEEK2, "DeepseekV3Config", "DeepseekV3ForCausalLM",
                     _no_gguf_config, ("deepseek_v3",)),
    )
}
# not a GGUF architecture name: a `llama` GGUF with experts (see `architecture_for_file`)
MIXTRAL = Architecture("llama", gguf.MODEL_ARCH.LLAMA, "MixtralConfig", "MixtralForCausalLM", _mixtral_config,
                       ("mixtral",), permute_qk=True)


def architecture_for(name: str, source: object) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ImatrixError(
            f"{source}: architecture '{name}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None


def architecture_for_file(model_file: GGUFModelFile) -> Architecture:
    """The adapter for a GGUF file: its architecture name, and for `llama` whether it has experts."""
    if model_file.architecture == "llama" and model_file.arch_value("expert_count"):
        return MIXTRAL
    return architecture_for(model_file.architecture, model_file.path)


def architecture_for_hf(model_type: str, source: object) -> Architecture:
    for arch in (*ARCHITECTURES.values(), MIXTRAL):
        if model_type in arch.hf_model_types:
            return arch
    supported = sorted(t for arch in (*ARCHITECTURES.values(), MIXTRAL) for t in arch.hf_model_types)
    raise ImatrixError(f"{source}: model_type '{model_type}' is not supported (supported: {', '.join(supported)})")


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of q/k rows (rope halves interleaved for ggml)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
