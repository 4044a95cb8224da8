"""EXAONE 4.0 (`exaone4`): post-norms only, q/k RMS norms; the 32B interleaves sliding-window layers
with global ones that skip rotary embeddings."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config, sliding_layer_types

# llama.cpp turns the sliding window on for this layer count only (the 32B; exaone4.cpp `load_arch_hparams`):
# other files run every layer globally, with rope, whatever window and pattern they state
SLIDING_WINDOW_LAYERS = 64


def exaone4_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = common_config(model_file)
    n_layer = config["num_hidden_layers"]
    if n_layer != SLIDING_WINDOW_LAYERS:
        # no window: transformers ropes every layer
        return {**config, "sliding_window": None, "layer_types": ["full_attention"] * n_layer}
    return {**config, "sliding_window": int(model_file.arch_value("attention.sliding_window", 4096)),
            "layer_types": sliding_layer_types(model_file, 4)}


ARCHITECTURES = (
    Architecture("exaone4", "Exaone4ForCausalLM", "Exaone4Config", exaone4_config, ("exaone4",)),
)
