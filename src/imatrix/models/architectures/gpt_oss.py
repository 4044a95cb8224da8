"""gpt-oss (`gpt-oss`): attention sinks, sliding-window layers, routed experts with biases and a clamped SwiGLU.

The checkpoint's experts interleave gate and up outputs (`gate_up_proj [E, n_embd, 2·n_ff]`, gate in
the even columns) and store their weights transposed; llama.cpp keeps gate and up apart, `[E, n_ff,
n_embd]` (the converter's `GptOssModel`). Real checkpoints hold the experts in MXFP4, which the
converter copies into the GGUF as is and gguf-py dequantizes.
"""

from __future__ import annotations

from typing import Any

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import (
    Architecture,
    common_config,
    rope_parameters,
    routed_experts,
    sliding_layer_types,
)
from imatrix.models.experts import StackJoin

# llama.cpp's LLM_FFN_SWIGLU_OAI_MOE ignores the checkpoint's values and uses these (`build_moe_ffn`)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


def gpt_oss_config(model_file: GGUFModelFile) -> dict[str, Any]:
    config = {**common_config(model_file), "rope_parameters": rope_parameters(model_file),
              **routed_experts(model_file, count="num_local_experts", width="intermediate_size"),
              "sliding_window": int(model_file.require_arch("attention.sliding_window")),
              # llama.cpp's openai-moe graph: every second layer from the first uses the window
              "layer_types": sliding_layer_types(model_file, 2),
              "attention_bias": "blk.0.attn_q.bias" in model_file.tensors,
              "swiglu_alpha": SWIGLU_ALPHA, "swiglu_limit": SWIGLU_LIMIT}
    for legacy_key in ("rope_theta", "rope_scaling"):  # stated in `rope_parameters`
        config.pop(legacy_key, None)
    return config


def as_llama_cpp_runs(config: Any) -> dict[str, Any]:
    """What llama.cpp's graph fixes whatever a checkpoint's config says: YaRN ramps over whole dimensions,
    the SwiGLU's constants."""
    return {"rope_parameters": {**config.rope_parameters, "truncate": True},
            "swiglu_alpha": SWIGLU_ALPHA, "swiglu_limit": SWIGLU_LIMIT}


ARCHITECTURES = (
    Architecture("gpt-oss", "GptOssForCausalLM", "GptOssConfig", gpt_oss_config, ("gpt_oss",),
                 # the converter names the sinks `.weight` (`GptOssModel.filter_tensors`)
                 extra_names=((r".*\.layers\.(\d+)\.self_attn\.sinks", r"blk.\1.attn_sinks.weight"),),
                 # transformers' GptOssExperts: `use_experts_implementation(is_concatenated=False, is_transposed=True)`
                 expert_join=StackJoin(interleaved=True, transposed=True), hf_overrides=as_llama_cpp_runs),
)
