"""SmolLM3 (`smollm3`): llama without rotary embeddings in every 4th layer."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config

# llama.cpp does not read the interval from the file (smollm3.cpp `load_arch_hparams`)
NO_ROPE_INTERVAL = 4


def smollm3_config(model_file: GGUFModelFile) -> dict[str, Any]:
    return {**common_config(model_file), "no_rope_layer_interval": NO_ROPE_INTERVAL, "use_sliding_window": False}


ARCHITECTURES = (
    Architecture("smollm3", "SmolLM3ForCausalLM", "SmolLM3Config", smollm3_config, ("smollm3",), permute_qk=True),
)
