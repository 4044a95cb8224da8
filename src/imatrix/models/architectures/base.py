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
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
import transformers

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.experts import StackJoin

if TYPE_CHECKING:
    from imatrix.models.observers import Observer

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


@dataclass(frozen=True)
class ColumnOrder:
    """Matmul weights (GGUF names matching `pattern`, re.search) whose input columns the converter reordered:
    `file_columns(config)[i]` is the checkpoint column the file's column i holds. Loading puts the columns
    back in checkpoint order; collection reports the input's sums in the file's order, as llama.cpp sees it."""

    pattern: str
    file_columns: Callable[[Config], np.ndarray]


@dataclass(frozen=True)
class Stacked:
    """Checkpoint parameters (`pattern`, fullmatch; group 1 their index) that the converter stacks into one
    GGUF tensor `gguf_name` along its outermost axis: parameter i is the file's matrix i."""

    pattern: str  # e.g. r"model\.altup_projections\.(\d+)\.weight"
    gguf_name: str  # e.g. "altup_proj.weight"

    def index(self, param: str) -> int | None:
        match = re.fullmatch(self.pattern, param)
        return None if match is None else int(match.group(1))


def always(source: object) -> bool:
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
    applies_to_hf: Callable[[dict[str, Any]], bool] = always  # the same, from a checkpoint's config.json
    is_variant: bool = False
    permute_qk: bool = False  # q/k rows permuted by the converter's `LlamaModel.permute`
    tensor_rules: tuple[TensorRule, ...] = ()
    fused: tuple[Fused, ...] = ()
    column_orders: tuple[ColumnOrder, ...] = ()
    stacked: tuple[Stacked, ...] = ()
    # checkpoint parameter name (regex, fullmatch) -> GGUF name template (`\1` groups), for what gguf-py's map lacks
    extra_names: tuple[tuple[str, str], ...] = ()
    logits: LogitsTransform | None = None  # what the causal-LM class does to lm_head's output (soft-capping…)
    decoder: str = "model"  # the causal-LM's attribute holding the decoder stack
    expert_join: StackJoin = StackJoin()  # how the GGUF expert stacks make the 3-D expert parameters
    # measure inputs llama.cpp multiplies that no module takes in transformers' forward (`models.observers`)
    observers: tuple[Observer, ...] = ()
    # a checkpoint directory's config -> the entries to change so that it states what llama.cpp's graph runs
    hf_overrides: Callable[[Config], dict[str, Any]] | None = None
    # where llama.cpp's graph computes a module differently from the checkpoint's forward and no config setting
    # makes them agree (PhiMoE runs as Phi-3): switches those modules of a built model to llama.cpp's computation
    graph_fixes: Callable[[torch.nn.Module], None] | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == self.gguf_name)

    def build_config(self, model_file: GGUFModelFile) -> Config:
        return self.config_type()(**self.config_from_gguf(model_file), **self.extra_config)

    def adapt_hf_config(self, config: Config) -> None:
        """Make a checkpoint's own config run as llama.cpp runs the model converted from it (`hf_overrides`)."""
        if self.hf_overrides is not None:
            config.update(self.hf_overrides(config))

    def fix_graph(self, model: torch.nn.Module) -> None:
        """Make a built model compute what llama.cpp's graph computes (`graph_fixes`)."""
        if self.graph_fixes is not None:
            self.graph_fixes(model)

    def config_type(self) -> type:
        return getattr(transformers, self.config_class)

    def model_type(self) -> type:
        return getattr(transformers, self.model_class)

    def convert_tensor(self, values: np.ndarray, config: Config, gguf_name: str) -> np.ndarray:
        """A GGUF tensor's values in checkpoint layout (q/k rows not included: see `permuted_heads`)."""
        for rule in self.tensor_rules:
            if rule.matches(gguf_name):
                values = rule.convert(values, config, gguf_name)
        columns = self.file_columns(config, gguf_name)
        return values if columns is None else values[..., np.argsort(columns)]

    def has_value_rules(self, gguf_name: str) -> bool:
        return (any(rule.matches(gguf_name) for rule in self.tensor_rules)
                or any(re.search(order.pattern, gguf_name) for order in self.column_orders))

    def file_columns(self, config: Config, gguf_name: str) -> np.ndarray | None:
        """Where the converter reordered `gguf_name`'s input columns: the checkpoint column behind each."""
        order = next((order for order in self.column_orders if re.search(order.pattern, gguf_name)), None)
        return None if order is None else order.file_columns(config)

    def stacked_slice(self, param: str) -> int | None:
        """Which matrix of a stacked GGUF tensor `param` is (None: it is not stacked)."""
        return next((index for stack in self.stacked if (index := stack.index(param)) is not None), None)

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
        "num_hidden_layers": n_trunk_layers(model_file),
        "num_attention_heads": n_head,
        "num_key_value_heads": _per_layer_max(model_file.arch_value("attention.head_count_kv", n_head)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(model_file.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(model_file.arch_value("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in model_file.tensors,
        "bos_token_id": model_file.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": model_file.get("tokenizer.ggml.eos_token_id"),
        # only an index for the embedding's gradient; some configs' defaults lie outside a small vocabulary
        "pad_token_id": model_file.get("tokenizer.ggml.padding_token_id"),
        **rope_config(model_file),
    }


def n_trunk_layers(model_file: GGUFModelFile) -> int:
    """The blocks the model runs: llama.cpp's `n_layer()` leaves out the NextN/MTP blocks stored after them."""
    return int(model_file.require_arch("block_count")) - int(model_file.arch_value("nextn_predict_layers", 0) or 0)


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


def partial_rotary(model_file: GGUFModelFile, head_dim: int) -> dict[str, float]:
    """`partial_rotary_factor`, from the rotated width of a head the file states (`rope.dimension_count`)."""
    rotated = model_file.arch_value("rope.dimension_count") or head_dim
    return {"partial_rotary_factor": int(rotated) / head_dim}


def rope_parameters(model_file: GGUFModelFile) -> dict[str, Any]:
    """The file's rope as transformers' `rope_parameters`, as llama.cpp applies it: its YaRN takes the file's
    betas and always rounds the correction range to whole dimensions (`ggml_rope_yarn_corr_dims`), which
    transformers calls `truncate`. (For configs that take no `rope_theta`/`rope_scaling`.)"""
    legacy = rope_config(model_file)
    parameters = {"rope_type": "default", "rope_theta": legacy["rope_theta"], **legacy.get("rope_scaling", {})}
    if parameters["rope_type"] == "yarn":
        parameters.update(truncate=True, beta_fast=float(model_file.arch_value("rope.scaling.yarn_beta_fast", 32.0)),
                          beta_slow=float(model_file.arch_value("rope.scaling.yarn_beta_slow", 1.0)))
    return parameters


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


def sliding_layer_types(model_file: GGUFModelFile, n_pattern: int) -> list[str]:
    """Which layers use the sliding window, as llama.cpp's `load_swa_pattern` reads it: one flag per layer,
    or a period (stored, else the architecture's)."""
    n_layer = int(model_file.require_arch("block_count"))
    stored = model_file.arch_value("attention.sliding_window_pattern")
    if isinstance(stored, list):
        return ["sliding_attention" if flag else "full_attention" for flag in stored]
    return periodic_layer_types(n_layer, int(stored) if stored is not None else n_pattern)


def periodic_layer_types(n_layer: int, period: int) -> list[str]:
    """The last layer of each period is global (period 0: all slide), `llama_hparams::set_swa_pattern`."""
    return ["sliding_attention" if period == 0 or layer % period < period - 1 else "full_attention"
            for layer in range(n_layer)]


def per_layer(value: int | list[int], n_layer: int) -> list[int]:
    """A hyperparameter llama.cpp may store per layer (an array), for every layer."""
    return [int(item) for item in value] if isinstance(value, list) else [int(value)] * n_layer


def without_sliding_window(config: Config) -> dict[str, Any]:
    """An `hf_overrides` for models whose window llama.cpp ignores: it attends over the whole context (phi3.cpp,
    mistral3.cpp)."""
    return {"sliding_window": None}


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
