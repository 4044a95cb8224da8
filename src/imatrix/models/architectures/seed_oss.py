"""ByteDance Seed-OSS (`seed_oss`): llama-like, with q/k/v biases."""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, common_config


def seed_oss_config(model_file: GGUFModelFile) -> dict[str, Any]:
    # llama.cpp loads no output-projection bias for seed_oss
    return {**common_config(model_file), "attention_bias": "blk.0.attn_q.bias" in model_file.tensors,
            "attention_out_bias": False}


ARCHITECTURES = (
    Architecture("seed_oss", "SeedOssForCausalLM", "SeedOssConfig", seed_oss_config, ("seed_oss",)),
)
