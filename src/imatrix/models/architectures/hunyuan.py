"""Hunyuan-A13B (`hunyuan-moe`: q/k norms after rotary, a shared MLP beside the routed experts on every layer)."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config


def hunyuan_moe_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp's hunyuan-moe sizes the routed experts by feed_forward_length, as transformers sizes both the
    # experts and the shared MLP by intermediate_size; both renormalise the softmax top-k weights
    return {**common_config(model_file), "num_experts": int(model_file.require_arch("expert_count")),
            "moe_topk": int(model_file.require_arch("expert_used_count"))}


ARCHITECTURES = (
    Architecture("hunyuan-moe", "HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Config", hunyuan_moe_config,
                 ("hunyuan_v1_moe",)),
)
