"""A model in memory, ready to run: an opened model (`models.open`) with every weight loaded.

GGUF weights are dequantized tensor by tensor from the mmapped file. On CPU, F16/BF16 matrices are not
even copied: the model reads them in place from the mmap, and gives their pages back after each use
(`models.storage`), so they cost page cache, not resident memory. A Hugging Face directory is loaded
by transformers' own `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import MappedPages
from imatrix.models.architectures.base import Architecture
from imatrix.models.experts import routes_to_experts
from imatrix.models.names import GGUFNames
from imatrix.models.open import OpenedModel, open_model
from imatrix.models.storage import (
    PageRelease,
    narrow_capable_parameters,
    storage_dtype,
    widen_narrow_modules,
)
from imatrix.models.tokenizer import TextTokenizer
from imatrix.models.weights import GGUFWeights, mapped_in_place, shaped_as


@dataclass
class LoadedModel:
    """A model ready to run. Its forward is the checkpoint's; its parameters are not always in checkpoint
    layout: on CPU a llama q/k projection read in place from an F16/BF16 GGUF keeps the file's row order
    (`models.storage.WideningLinear.file_order_head_rows`), and 16-bit weights stay 16-bit."""

    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: TextTokenizer
    architecture: Architecture
    gguf_names: GGUFNames  # parameter name (model.layers.0.self_attn.q_proj.weight) -> its GGUF tensors
    source: Path
    # 3-D expert parameter -> the GGUF stacks (`blk.N.ffn_gate_exps.weight`, …) it is made of
    expert_stacks: GGUFNames = field(default_factory=dict)

    @property
    def config(self) -> Any:  # a transformers PretrainedConfig
        return self.model.config

    @property
    def decoder(self) -> torch.nn.Module:
        """The decoder stack: token ids in, final normed hidden states out."""
        return getattr(self.model, self.architecture.decoder)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def is_moe(self) -> bool:
        """Whether its layers route tokens to experts (it has expert stacks or routers)."""
        return routes_to_experts({**self.gguf_names, **self.expert_stacks})

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the causal-LM class does to the output projection's values (soft-capping, scaling)."""
        transform = self.architecture.logits
        return transform(logits, self.config) if transform else logits


def load_model(path: str | Path | OpenedModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               round_to_f16: bool = False) -> LoadedModel:
    """Load `path` (a .gguf file or a Hugging Face checkpoint directory, or one opened already) onto `device`.

    `round_to_f16` rounds every non-F32 weight to float16 first, which turns a quantized GGUF
    into exactly the F16 model llama-quantize would make from it. Matmul weights stored at 16 bits
    (F16/BF16, or rounded) stay 16-bit in memory and are widened per call (`models.storage`);
    on CPU those the file stores as F16/BF16 are read in place from its mmap.
    """
    opened = path if isinstance(path, OpenedModel) else open_model(path, device)
    if not isinstance(opened.weights, GGUFWeights):
        from imatrix.models.hf_loader import load_hf_weights

        return load_hf_weights(opened, device, dtype)
    state, file_order_head_rows = _gguf_state(opened, opened.weights, device, dtype, round_to_f16)
    model = opened.skeleton
    _assign_weights(model, state, opened.source, device, dtype, tensor_page_release(opened.weights.model_file.pages))
    for param, head_rows in file_order_head_rows.items():
        model.get_submodule(param.rpartition(".")[0]).file_order_head_rows = head_rows
    return loaded_from(opened, model)


def loaded_from(opened: OpenedModel, model: torch.nn.Module) -> LoadedModel:
    return LoadedModel(model, opened.tokenizer, opened.architecture, opened.gguf_names, opened.source,
                       opened.expert_stacks)


def _gguf_state(opened: OpenedModel, weights: GGUFWeights, device: str | torch.device, dtype: torch.dtype,
                round_to_f16: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every weight the file holds, and the q/k weights left in the file's row order (-> rows per head)."""
    model_file, architecture, config = weights.model_file, opened.architecture, opened.config
    narrow_capable = narrow_capable_parameters(opened.skeleton)
    in_place = torch.device(device).type == "cpu"
    state, file_order_head_rows = {}, {}
    for param, names in {**opened.gguf_names, **opened.expert_stacks}.items():
        if not all(name in model_file.tensors for name in names):
            continue
        info = model_file.tensors[names[0]]
        kept_as = dtype
        if param in narrow_capable and len(names) == 1:
            kept_as = storage_dtype(info.tensor_type, dtype, round_to_f16)
        n_head = architecture.permuted_heads(config, names[0])
        # widened per call anyway: the widening puts the rows in order (`models.storage`)
        keep_file_order = n_head > 0 and kept_as != dtype and mapped_in_place(info, kept_as, in_place)
        state[param] = weights.values(param, names, round_to_f16, kept_as, in_place, keep_file_order)
        if keep_file_order:
            file_order_head_rows[param] = info.shape[0] // n_head
        for name in names:
            model_file.release_pages(name)
    return state, file_order_head_rows


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
    state = {name: shaped_as(tensor, shapes[name], name, source).to(device=device) for name, tensor in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    widen_narrow_modules(model, dtype, release_pages)
    model.eval()

