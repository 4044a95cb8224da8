"""Rotary frequency factors that a GGUF file stores as a tensor instead of as config keys."""

from __future__ import annotations

import torch

from imatrix.ggufio.reader import GGUFModelFile

ROPE_FREQS = "rope_freqs.weight"


def apply_rope_freq_factors(model: torch.nn.Module, model_file: GGUFModelFile) -> None:
    """Divide the rotary embeddings' inverse frequencies by the file's `rope_freqs` factors.

    The converter turns a Llama 3.1-style `rope_scaling` (rope type `llama3`) into that tensor and leaves
    no scaling keys; llama.cpp's `ggml_rope_ext` divides each frequency by its factor, on every layer."""
    if ROPE_FREQS not in model_file.tensors:
        return
    factors = torch.from_numpy(model_file.tensor_f32(ROPE_FREQS)).reshape(-1)
    with torch.no_grad():
        for module in model.modules():
            for name in ("inv_freq", "original_inv_freq"):
                frequencies = module._buffers.get(name)
                if frequencies is not None and frequencies.shape[-1] == factors.numel():
                    frequencies.div_(factors.to(frequencies.device, frequencies.dtype))
