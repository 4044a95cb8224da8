"""LFM2 (`lfm2`): short-convolution blocks, with full attention on some layers.

Besides renames (gguf-py's tensor map has them all, the final norm as `token_embd_norm` included), the
converter only squeezes the convolution kernel to 2-D, which loading reshapes back. The config is
transformers' own GGUF table.
"""

from __future__ import annotations

from typing import Any

from transformers.integrations.gguf.gguf_config_mapping import get_gguf_config

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture

# what transformers' table states about the checkpoint, not about the config class's arguments
_NOT_ARGUMENTS = ("model_type", "architectures")


def lfm2_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # the table takes the vocabulary as its length, as transformers' GGUF reader leaves it
    n_tokens = len(model_file.require("tokenizer.ggml.tokens"))
    config = get_gguf_config({**model_file.metadata, "tokenizer.ggml.tokens": n_tokens}, tuple(model_file.tensors))
    return {key: value for key, value in config.items() if key not in _NOT_ARGUMENTS}


ARCHITECTURES = (
    Architecture("lfm2", "Lfm2ForCausalLM", "Lfm2Config", lfm2_config, ("lfm2", "lfm2_vl")),
)
