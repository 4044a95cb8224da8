"""Optional emulation of how llama.cpp's CPU backend feeds activations to its matmuls.

ggml's CPU `mul_mat` does not multiply a quantized weight by float32 activations: it first converts
the activations to the weight type's `vec_dot_type` (ggml-cpu's type traits) and takes integer dot
products. Q4_0 / Q5_0 / Q8_0 / IQ4_NL weights meet activations quantized to Q8_0 (32 values per
fp16 scale), Q4_1 / Q5_1 meet Q8_1 (the same values), the K-quants and IQ4_XS meet Q8_K (256 values
per float32 scale), F16 / BF16 weights meet activations rounded to that type. Our evaluator multiplies
dequantized weights by float32 activations, which is what the weights mean but scores low-bit quants
slightly better than llama-perplexity does. With this emulation on, each `nn.Linear` whose GGUF
weight is stored in such a type gets its input rounded the same way first, so PPL and KLD can be
compared with llama-perplexity's figures like for like.

Not emulated: the F16 KV cache and the attention matmuls, and the fused 3-D expert weights of MoE
models (their inputs stay float32).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import gguf
import torch

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.loader import LoadedModel
from imatrix.quant.hifi import HIFI_TYPE_ID

QType = gguf.GGMLQuantizationType
Rounding = Callable[[torch.Tensor], torch.Tensor]


def q8_0_values(x: torch.Tensor) -> torch.Tensor:
    """x as ggml's x86 `quantize_row_q8_0` stores it: per 32 values amax/127 as fp16, levels rounded to even."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = (amax / 127).to(torch.float16).to(x.dtype)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def q8_k_values(x: torch.Tensor) -> torch.Tensor:
    """x as `quantize_row_q8_K_ref` stores it: per 256 values the float32 scale of the signed extreme,
    levels rounded to even and capped at 127."""
    blocks = x.reshape(*x.shape[:-1], -1, 256)
    extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    nonzero = extreme != 0
    iscale = torch.where(nonzero, -127 / extreme, torch.zeros_like(extreme))
    levels = torch.round(blocks * iscale).clamp(max=127)
    scale = torch.where(nonzero, 1 / iscale, torch.zeros_like(iscale))
    return (levels * scale).reshape(x.shape)


def _rounded_to(dtype: torch.dtype) -> Rounding:
    return lambda x: x.to(dtype).to(x.dtype)


# weight type -> (values per activation block, how its activations are rounded)
_Q8_0 = (32, q8_0_values)
_Q8_K = (256, q8_k_values)
VEC_DOT: dict[enum.IntEnum, tuple[int, Rounding]] = {
    QType.Q4_0: _Q8_0, QType.Q5_0: _Q8_0, QType.Q8_0: _Q8_0, QType.IQ4_NL: _Q8_0,
    QType.Q4_1: _Q8_0, QType.Q5_1: _Q8_0,  # Q8_1 holds the same values as Q8_0, plus their sum
    QType.Q2_K: _Q8_K, QType.Q3_K: _Q8_K, QType.Q4_K: _Q8_K, QType.Q5_K: _Q8_K, QType.Q6_K: _Q8_K,
    QType.IQ4_XS: _Q8_K, HIFI_TYPE_ID: _Q8_K,
    QType.F16: (1, _rounded_to(torch.float16)), QType.BF16: (1, _rounded_to(torch.bfloat16)),
}


def activation_rounding(weight_type: enum.IntEnum, n_cols: int) -> Rounding | None:
    """How llama.cpp's CPU backend rounds the input of a matmul with this weight type (None: not at all)."""
    entry = VEC_DOT.get(weight_type)
    if entry is None or n_cols % entry[0]:
        return None
    return entry[1]


def emulate_cpu_matmul_inputs(loaded: LoadedModel) -> list[torch.utils.hooks.RemovableHandle]:
    """Round the input of every `nn.Linear` of a GGUF model as llama.cpp's CPU matmul would (see the
    module docstring). Returns the hook handles; removing them turns the emulation off."""
    if loaded.source.is_dir():
        raise ImatrixError(f"{loaded.source}: the llama.cpp CPU emulation needs a GGUF model")
    types = {name: info.tensor_type for name, info in GGUFModelFile(loaded.source).tensors.items()}
    modules = dict(loaded.model.named_modules())
    handles = []
    for param, gguf_names in loaded.gguf_names.items():
        gguf_name = gguf_names[0]
        if gguf_name == "output.weight" and gguf_name not in types:
            gguf_name = "token_embd.weight"  # tied embeddings: the output matmul reads token_embd
        module = modules.get(param.rpartition(".")[0])
        if not isinstance(module, torch.nn.Linear) or gguf_name not in types:
            continue
        rounding = activation_rounding(types[gguf_name], module.in_features)
        if rounding is not None:
            handles.append(module.register_forward_pre_hook(_pre_hook(rounding)))
    return handles


def _pre_hook(rounding: Rounding) -> Callable[[torch.nn.Module, tuple], tuple]:
    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        return (rounding(args[0]), *args[1:])

    return hook
