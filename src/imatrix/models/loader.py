"""Load a model for collection: GGUF file or Hugging Face directory -> transformers module + tokenizer.

The GGUF path is ours: config from metadata, state dict through gguf-py's name map in reverse,
weights dequantized tensor by tensor from the mmapped file, tokenizer from the GGUF vocab. On CPU,
F16/BF16 matrices are not even copied: the model reads them in place from the mmap, and gives
their pages back after each use (`models.storage`), so they cost page cache, not resident memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.models.architectures import (
    Architecture,
    architecture_for_file,
    architecture_for_hf,
    unpermute_rows,
)
from imatrix.models.attention import use_blocked_attention
from imatrix.models.experts import fused_expert_stacks, join_stacks
from imatrix.models.gguf_reader import GGUFModelFile, MappedPages
from imatrix.models.mlp import compute_mlps_in_place
from imatrix.models.storage import (
    PageRelease,
    exact_16_bit_dtype,
    narrow_capable_parameters,
    storage_dtype,
    widen_narrow_modules,
)
from imatrix.models.tokenizer import TextTokenizer, tokenizer_from_gguf


@dataclass
class LoadedModel:
    """A model ready to run. Its forward is the checkpoint's; its parameters are not always in checkpoint
    layout: on CPU a llama q/k projection read in place from an F16/BF16 GGUF keeps the file's row order
    (`models.storage.WideningLinear.file_order_head_rows`), and 16-bit weights stay 16-bit."""

    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: TextTokenizer
    architecture: Architecture
    gguf_names: dict[str, str]  # parameter name (model.layers.0.self_attn.q_proj.weight) -> GGUF name
    source: Path
    # 3-D expert parameter -> the GGUF stacks (`blk.N.ffn_gate_exps.weight`, …) it is made of
    expert_stacks: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def config(self):  # noqa: ANN201 - a transformers PretrainedConfig
        return self.model.config


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               round_to_f16: bool = False) -> LoadedModel:
    """Load `path` (a .gguf file or a Hugging Face checkpoint directory) onto `device`.

    `round_to_f16` rounds every non-F32 weight to float16 first, which turns a quantized GGUF
    into exactly the F16 model llama-quantize would make from it. Matmul weights stored at 16 bits
    (F16/BF16, or rounded) stay 16-bit in memory and are widened per call (`models.storage`);
    on CPU those the file stores as F16/BF16 are read in place from its mmap.
    """
    source = Path(path)
    if source.is_dir():
        from imatrix.models.hf_loader import load_hf_model

        return load_hf_model(source, device, dtype)
    model_file = GGUFModelFile(source)
    architecture = architecture_for_file(model_file)
    config = architecture.build_config(model_file)
    model = empty_model(architecture, config)
    gguf_names = gguf_name_map(model, architecture, config.num_hidden_layers)
    stacks = expert_stack_map(model, architecture, config.num_hidden_layers)
    narrow_capable = narrow_capable_parameters(model)
    in_place = torch.device(device).type == "cpu"
    state = {}
    file_order_head_rows = {}  # q/k weights read in place, rows in the file's order -> rows per head
    for param, gguf_name in gguf_names.items():
        if gguf_name in model_file.tensors:
            info = model_file.tensors[gguf_name]
            kept_as = dtype
            if param in narrow_capable:
                kept_as = storage_dtype(info.tensor_type, dtype, round_to_f16)
            n_head = rope_permuted_heads(architecture, config, gguf_name)
            # widened per call anyway: the widening puts the rows in order (`models.storage`)
            keep_file_order = n_head > 0 and kept_as != dtype and _mapped_in_place(info, kept_as, in_place)
            state[param] = gguf_tensor(model_file, architecture, config, gguf_name, round_to_f16, kept_as, in_place,
                                       keep_file_order)
            if keep_file_order:
                file_order_head_rows[param] = info.shape[0] // n_head
            model_file.release_pages(gguf_name)
    for param, names in stacks.items():
        if all(name in model_file.tensors for name in names):
            state[param] = gguf_expert_tensor(model_file, names, round_to_f16).to(dtype)
            for name in names:
                model_file.release_pages(name)
    _assign_weights(model, state, source, device, dtype, tensor_page_release(model_file.pages))
    for param, head_rows in file_order_head_rows.items():
        model.get_submodule(param.rpartition(".")[0]).file_order_head_rows = head_rows
    return LoadedModel(model, tokenizer_from_gguf(model_file), architecture, gguf_names, source, stacks)


def empty_model(architecture: Architecture, config) -> torch.nn.Module:  # noqa: ANN001
    """The transformers model on the meta device, with our forwards (`use_collection_forwards`)."""
    with torch.device("meta"):
        model = architecture.model_type()(config)
    use_collection_forwards(model)
    return model


def use_collection_forwards(model: torch.nn.Module) -> None:
    """Attention blocked on the CPU (`models.attention`) and MLPs in place (`models.mlp`): the same
    values as transformers' forwards, faster and in less memory."""
    use_blocked_attention(model)
    compute_mlps_in_place(model)


def gguf_name_map(model: torch.nn.Module, architecture: Architecture, n_blocks: int) -> dict[str, str]:
    """Checkpoint parameter names -> GGUF tensor names, via gguf-py's tensor map.

    3-D expert parameters are left out: see `expert_stack_map`.
    """
    tensor_map = gguf.get_tensor_name_map(architecture.gguf_arch, n_blocks)
    fused = fused_expert_stacks(model, tensor_map)
    names = {}
    for param in model.state_dict():
        if param in fused:
            continue
        gguf_base = tensor_map.get_name(param, try_suffixes=(".weight", ".bias"))  # keeps the suffix
        if gguf_base is not None:
            names[param] = gguf_base
    return names


def expert_stack_map(model: torch.nn.Module, architecture: Architecture, n_blocks: int) -> dict[str, tuple[str, ...]]:
    """3-D expert parameter names -> the GGUF expert stacks they are made of (`gate_up_proj` -> gate, up)."""
    return fused_expert_stacks(model, gguf.get_tensor_name_map(architecture.gguf_arch, n_blocks))


def gguf_expert_tensor(model_file: GGUFModelFile, names: tuple[str, ...], round_to_f16: bool) -> torch.Tensor:
    """One 3-D expert parameter from its GGUF stacks (`[n_expert, rows, cols]` each, same layout)."""
    stacks = []
    for name in names:
        stack = model_file.tensor_f32(name)
        if round_to_f16 and model_file.tensors[name].tensor_type != gguf.GGMLQuantizationType.F32:
            stack = stack.astype(np.float16).astype(np.float32)
        stacks.append(stack)
    return torch.from_numpy(np.array(join_stacks(stacks), dtype=np.float32, order="C"))


def gguf_tensor(model_file: GGUFModelFile, architecture: Architecture, config, name: str,  # noqa: ANN001
                round_to_f16: bool, dtype: torch.dtype = torch.float32, in_place: bool = False,
                keep_file_row_order: bool = False) -> torch.Tensor:
    """One weight in checkpoint layout as a `dtype` tensor of its own.

    A 16-bit tensor asked for in its own dtype is taken from the file as is, without a float32 pass:
    with `in_place`, as a view of the mmap unless its rows must be reordered, else as a copy. With
    `keep_file_row_order`, a llama q/k weight is not reordered: the caller does it when widening.
    """
    info = model_file.tensors[name]
    n_head = rope_permuted_heads(architecture, config, name)
    if exact_16_bit_dtype(info.tensor_type) == dtype:
        weight = model_file.raw(name).view(np.uint16).reshape(info.shape)  # the bit patterns as stored
        if _mapped_in_place(info, dtype, in_place) and (not n_head or keep_file_row_order):
            return torch.from_numpy(weight).view(dtype)
    else:
        weight = model_file.tensor_f32(name)
        if round_to_f16 and info.tensor_type != gguf.GGMLQuantizationType.F32:
            weight = weight.astype(np.float16).astype(np.float32)
    if n_head:
        weight = unpermute_rows(weight, n_head)
    tensor = torch.from_numpy(np.array(weight, order="C"))  # own copy, not the mmap
    return tensor.view(dtype) if tensor.dtype == torch.uint16 else tensor.to(dtype)


def rope_permuted_heads(architecture: Architecture, config, name: str) -> int:  # noqa: ANN001
    """The number of heads whose rows llama.cpp's converter permuted in GGUF tensor `name` (0: none)."""
    if not architecture.permute_qk or not name.endswith(("attn_q.weight", "attn_k.weight")):
        return 0
    return config.num_attention_heads if "attn_q" in name else config.num_key_value_heads


def _mapped_in_place(info, dtype: torch.dtype, in_place: bool) -> bool:  # noqa: ANN001 - a GGUF tensor's info
    """Whether a tensor can be used as a view of the mapped file: its 16-bit values, 2-byte aligned."""
    return in_place and exact_16_bit_dtype(info.tensor_type) == dtype and info.offset % 2 == 0  # GGUF aligns to 32


def tensor_page_release(pages: MappedPages) -> PageRelease:
    """Release the file pages under a tensor that is a view of the mapped file (others are left alone)."""

    def release(tensor: torch.Tensor) -> None:
        pages.release(tensor.data_ptr(), tensor.numel() * tensor.element_size())

    return release


def _assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path,
                    device: str | torch.device, dtype: torch.dtype, release_pages: PageRelease | None = None) -> None:
    expected = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ImatrixError(f"{source}: tensors missing for {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    # GGUF drops unit dimensions (Qwen2-MoE's ffn_gate_inp_shexp is [n_embd], the Linear's weight [1, n_embd])
    state = {name: tensor.reshape(shapes[name]).to(device=device) for name, tensor in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    widen_narrow_modules(model, dtype, release_pages)
    rebuild_meta_buffers(model, device)
    model.eval()


def rebuild_meta_buffers(model: torch.nn.Module, device: str | torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) stay on 'meta' after assign; rebuild their modules."""
    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            rebuilt = type(module)(config=model.config).to(device)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)


def read_hf_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ImatrixError(f"{directory}: not a Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ImatrixError(f"{config_path}: invalid JSON ({exc.msg})") from exc


def hf_architecture(directory: Path) -> Architecture:
    return architecture_for_hf(read_hf_config(directory).get("model_type", "?"), directory)
