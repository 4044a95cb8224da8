"""Falcon-H1 (`falcon-h1`): every layer runs attention and a Mamba2 mixer side by side.

llama.cpp's converter folds all of Falcon-H1's µP multipliers into the weights (`FalconH1Model.
modify_tensors`) and states none in the metadata: a GGUF file is the checkpoint with every multiplier
1. transformers applies two of them to a matmul's *input* (`attention_in_multiplier` before q/k/v,
`ssm_in_multiplier` before `in_proj`), which llama.cpp's graph feeds the normed hidden states alone:
from a checkpoint directory, those inputs are measured divided by the multiplier (`UnmultipliedInputs`).
"""

from __future__ import annotations

from typing import Any

import torch

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, Config, common_config
from imatrix.models.architectures.mamba2 import MAMBA2_NAMES, MAMBA2_RULES, mamba2_config
from imatrix.models.observers import MatrixSink, ObservedTarget
from imatrix.models.patches import Handle

# multiplier -> its neutral value: the converter multiplied each into the weights
FOLDED_MULTIPLIERS: dict[str, Any] = {
    "embedding_multiplier": 1.0, "lm_head_multiplier": 1.0, "key_multiplier": 1.0,
    "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0, "ssm_in_multiplier": 1.0,
    "ssm_out_multiplier": 1.0, "mlp_multipliers": [1.0, 1.0], "ssm_multipliers": [1.0] * 5,
}


def falcon_h1_config(model_file: GGUFModelFile) -> dict[str, Any]:
    tensors = model_file.tensors
    return {**common_config(model_file), **mamba2_config(model_file), **FOLDED_MULTIPLIERS,
            "mamba_d_ssm": int(model_file.require_arch("ssm.inner_size")),
            # llama.cpp's Mamba2 layer gates before its grouped norm, and normalises only where the file has one
            "mamba_rms_norm": "blk.0.ssm_norm.weight" in tensors, "mamba_norm_before_gate": False,
            "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}


# GGUF kind -> the decoder layer's matmul whose input transformers multiplies, and the layer's attribute
# holding that multiplier
MULTIPLIED_INPUTS = {
    "attn_q": ("self_attn.q_proj", "attention_in_multiplier"),
    "attn_k": ("self_attn.k_proj", "attention_in_multiplier"),
    "attn_v": ("self_attn.v_proj", "attention_in_multiplier"),
    "ssm_in": ("mamba.in_proj", "mamba.ssm_in_multiplier"),
}


class UnmultipliedInputs:
    """The inputs llama.cpp's graph gives q/k/v and `ssm_in` (the normed hidden states), where a checkpoint's
    forward hands those matmuls the hidden states times a multiplier: measured divided by it. A GGUF
    file's multipliers are 1 (folded into the weights), and its modules are measured as they are."""

    def find(self, model: torch.nn.Module, gguf_names: dict[str, tuple[str, ...]]) -> dict[str, ObservedTarget]:
        targets = {}
        for param, names in gguf_names.items():
            for kind, (matmul, multiplier) in MULTIPLIED_INPUTS.items():
                layer_path = param.removesuffix(f".{matmul}.weight")
                if layer_path == param:
                    continue
                layer = model.get_submodule(layer_path)
                if _attribute(layer, multiplier) != 1.0:
                    n_cols = layer.get_submodule(matmul).in_features
                    targets[names[0]] = ObservedTarget(layer, kind, 1, n_cols, self)
        return targets

    def attach(self, module: torch.nn.Module, names: dict[str, str], sink: MatrixSink) -> list[Handle]:
        handles = []
        for kind, name in names.items():
            matmul, multiplier = MULTIPLIED_INPUTS[kind]
            hook = _divided_input(sink, name, _attribute(module, multiplier))
            handles.append(module.get_submodule(matmul).register_forward_pre_hook(hook))
        return handles


def _divided_input(sink: MatrixSink, name: str, multiplier: float):  # noqa: ANN202
    def hook(_module: torch.nn.Module, args: tuple) -> None:
        inputs = args[0]  # [n_seq, n_tokens, n_cols]: one matrix
        sink.observe_matrices(name, (inputs / multiplier).unsqueeze(-3))

    return hook


def _attribute(module: torch.nn.Module, path: str) -> float:
    owner, _, attribute = path.rpartition(".")
    return float(getattr(module.get_submodule(owner) if owner else module, attribute))


def multiplied_logits(logits: torch.Tensor, config: Config) -> torch.Tensor:
    """`FalconH1ForCausalLM` multiplies lm_head's output by `lm_head_multiplier` (1 in a GGUF file)."""
    return logits * config.lm_head_multiplier


ARCHITECTURES = (
    Architecture("falcon-h1", "FalconH1ForCausalLM", "FalconH1Config", falcon_h1_config, ("falcon_h1",),
                 tensor_rules=MAMBA2_RULES, extra_names=MAMBA2_NAMES, logits=multiplied_logits,
                 observers=(UnmultipliedInputs(),)),
)
