"""DeepSeek V2/V3 (`deepseek2`: multi-head latent attention, shared and routed experts)."""

from __future__ import annotations

from typing import Any

from imatrix.errors import ImatrixError
from imatrix.models.architectures.base import Architecture
from imatrix.models.gguf_reader import GGUFModelFile


def no_gguf_config(model_file: GGUFModelFile) -> dict[str, Any]:
    raise ImatrixError(f"{model_file.path}: loading '{model_file.architecture}' GGUF files is not supported yet "
                       "(a Hugging Face checkpoint directory of the model is)")


ARCHITECTURES = (
    Architecture("deepseek2", "DeepseekV3ForCausalLM", "DeepseekV3Config", no_gguf_config, ("deepseek_v3",)),
)
