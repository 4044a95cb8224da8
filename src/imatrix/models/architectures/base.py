"""What an architecture adapter holds, and the pieces adapters share.

An adapter turns a llama.cpp GGUF file back into the transformers checkpoint it was converted from:
the config from the metadata, and for each tensor the inverse of what `convert_hf_to_gguf.py` did to
it (a rename through gguf-py's tensor map, plus the rules below). The forward is transformers' own
modeling class. `docs/architectures.md` says how to add one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np
import torch
import transformers

from imatrix.models.gguf_reader import GGUFModelFile

Config = Any  # a transformers PretrainedConfig
ConfigFromGGUF = Callable[[GGUFModelFile], dict[str, Any]]
# GGUF tensor values (numpy order) -> checkpoint values, for one tensor; `name` is the GGUF name
TensorConvert = Callable[[np.ndarray, Config, str], np.ndarray]
# several GGUF tensors, in the order `Fused.kinds` names them -> one checkpoint tensor
Assemble = Callable[[list[np.ndarray], Config], np.ndarray]
LogitsTransform = Callable[[torch.Tensor, Config], torch.Tensor]


@dataclass(frozen=True)
class TensorRule:
    """Applies `convert` to every GGUF tensor whose name matches `pattern` (re.search)."""

    pattern: str
    convert: TensorConvert

    def matches(self, gguf_name: str) -> bool:
        return re.search(self.pattern, gguf_name) is not None


@dataclass(frozen=True)
class Fused:
    """A module's parameters (`<prefix>.N.<module>.weight`/`.bias`, N the block) that llama.cpp stores as
    several tensors `blk.N.<kind>.weight`/`.bias`; `assemble` joins them back (default: rows in order).
    Collection gives every one of those tensors the module's input."""

    module: str  # e.g. "linear_attn.in_proj_qkvz"
    kinds: tuple[str, ...]  # e.g. ("attn_qkv", "attn_gate")
    assemble: Assemble | None = None

    def join(self, tensors: list[np.ndarray], config: Config) -> np.ndarray:
        return self.assemble(tensors, config) if self.assemble else np.concatenate(tensors, axis=0)


def always(model_file: GGUFModelFile) -> bool:
    return True


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # llama.cpp's `general.architecture`
    model_class: str  # the transformers causal-LM class
    config_class: str
    config_from_gguf: ConfigFromGGUF
    hf_model_types: tuple[str, ...] = ()  # config.json `model_type`s this adapter also loads
    # a variant shares its GGUF name with another adapter (Mixtral is `llama` with experts): checked first
    applies_to: Callable[[GGUFModelFile], bool] = always
    is_variant: bool = False
    permute_qk: bool = False  # q/k rows permuted by the converter's `LlamaModel.permute`
    tensor_rules: tuple[TensorRule, ...] = ()
    fused: tuple[Fused, ...] = ()
    # checkpoint parameter name (regex, fullmatch) -> GGUF name template (`\1` groups), for what gguf-py's map lacks
    extra_names: tuple[tuple[str, str], ...] = ()
    logits: LogitsTransform | None = None  # what the causal-LM class does to lm_head's output (soft-capping…)
    decoder: str = "model"  # the causal-LM's attribute holding the decoder stack
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == self.gguf_name)

    def build_config(self, model_file: GGUFModelFile) -> Config:
        return self.config_type()(**self.config_from_gguf(model_file), **self.extra_config)

    def config_type(self) -> type:
        return getattr(transformers, self.config_class)

    def model_type(self) -> type:
        return getattr(transformers, self.model_class)

    def convert_tensor(self, values: np.ndarray, config: Config, gguf_name: str) -> np.ndarray:
        """A GGUF tensor's values in checkpoint layout (q/k rows not included: see `permuted_heads`)."""
        for rule in self.tensor_rules:
            if rule.matches(gguf_name):
                values = rule.convert(values, config, gguf_name)
        return values

    def has_value_rules(self, gguf_name: str) -> bool:
        return any(rule.matches(gguf_name) for rule in self.tensor_rules)

    def permuted_heads(self, config: Config, gguf_name: str) -> int:
        """The number of heads whose rows llama.cpp's converter permuted in `gguf_name` (0: none)."""
        if not self.permute_qk or not gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            return 0
        return config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads


# --- metadata -> config -------------------------------------------------------------------------------------

def common_config(model_file: GGUFModelFile) -> dict[str, Any]:
    """What every decoder-only transformer states the same way in GGUF metadata."""
    n_head = _per_layer_max(model_file.require_arch("attention.head_count"))
    hidden = int(model_file.require_arch("embedding_length"))
    head_dim = model_file.arch_value("attention.key_length") or hidden // n_head
    return {
        "vocab_size": len(model_file.require("tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": _per_layer_max(model_file.arch_value("feed_forward_length", 0) or 0),
        "num_hidden_layers": int(model_file.require_arch("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": _per_layer_max(model_file.arch_value("attention.head_count_kv", n_head)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(model_file.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(model_file.arch_value("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in model_file.tensors,
        "bos_token_id": model_file.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": model_file.get("tokenizer.ggml.eos_token_id"),
        **rope_config(model_file),
    }


def rope_config(model_file: GGUFModelFile) -> dict[str, Any]:
    """`rope_theta`, and `rope_scaling` where the file states a linear or YaRN scaling."""
    theta = float(model_file.arch_value("rope.freq_base", 10000.0))
    kind = model_file.arch_value("rope.scaling.type")
    factor = model_file.arch_value("rope.scaling.factor")
    if kind not in ("linear", "yarn") or not factor or float(factor) == 1.0:
        return {"rope_theta": theta}
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = model_file.arch_value("rope.scaling.original_context_length")
    if kind == "yarn" and original:
        scaling["original_max_position_embeddings"] = int(original)
    return {"rope_theta": theta, "rope_scaling": scaling}


def routed_experts(model_file: GGUFModelFile, **names: str) -> dict[str, Any]:
    """Expert count, experts per token and expert width, under the config's own key names
    (`count`, `used`, `width`; defaults are Qwen-MoE's)."""
    n_used = int(model_file.require_arch("expert_used_count"))
    # llama.cpp falls back to feed_forward_length / n_expert_used when the GGUF has no expert size
    width = (model_file.arch_value("expert_feed_forward_length")
             or _per_layer_max(model_file.require_arch("feed_forward_length")) // n_used)
    return {names.get("count", "num_experts"): int(model_file.require_arch("expert_count")),
            names.get("used", "num_experts_per_tok"): n_used,
            names.get("width", "moe_intermediate_size"): int(width)}


def _per_layer_max(value: int | list[int]) -> int:
    """A hyperparameter llama.cpp may store per layer (an array): its largest value."""
    return int(max(value)) if isinstance(value, list) else int(value)


# --- tensor rules -------------------------------------------------------------------------------------------

def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of q/k rows (rope halves interleaved for ggml)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def minus_one(values: np.ndarray, config: Config, name: str) -> np.ndarray:
    """Zero-centred norms: the converter stores `1 + w` (the checkpoint's forward multiplies by 1 + w)."""
    return (values.astype(np.float32) - 1.0).astype(values.dtype)


def plain_logits(logits: torch.Tensor, config: Config) -> torch.Tensor:
    return logits


def soft_capped_logits(logits: torch.Tensor, config: Config) -> torch.Tensor:
    """`final_logit_softcapping` (Gemma 2/3): cap · tanh(logits / cap)."""
    cap = getattr(config, "final_logit_softcapping", None)
    if not cap:
        return logits
    return torch.tanh(logits / cap) * cap
