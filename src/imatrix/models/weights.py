"""Where a model's weights come from, one checkpoint parameter at a time, in checkpoint layout.

`GGUFWeights` undoes what llama.cpp's converter did (the adapter's rules, q/k row order, fused and
expert tensors) on tensors dequantized from the mmapped file; 16-bit tensors can be handed out as
views of the file itself. `SafetensorsWeights` reads a Hugging Face checkpoint's shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gguf
import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile, TensorInfo
from imatrix.models.architectures.base import Architecture, unpermute_rows
from imatrix.models.names import GGUFNames
from imatrix.models.storage import exact_16_bit_dtype


class WeightSource(Protocol):
    def tensor(self, param: str) -> torch.Tensor:
        """One checkpoint tensor by parameter name (`model.layers.0.mlp.up_proj.weight`), float32 on the host."""
        ...


@dataclass
class GGUFWeights:
    model_file: GGUFModelFile
    architecture: Architecture
    config: Any  # the transformers config the adapter built
    gguf_names: GGUFNames  # parameter -> its GGUF tensors
    expert_stacks: GGUFNames  # 3-D expert parameter -> its GGUF stacks

    def tensor(self, param: str) -> torch.Tensor:
        """`param` as float32, in checkpoint layout, a copy of its own (file pages released)."""
        names = self._names(param)
        tensor = self.values(param, names, round_to_f16=False)
        for name in names:
            self.model_file.release_pages(name)
        return tensor

    def _names(self, param: str) -> tuple[str, ...]:
        names = self.expert_stacks.get(param) or self.gguf_names.get(param)
        if param == "lm_head.weight" and (names is None or names[0] not in self.model_file.tensors):
            names = ("token_embd.weight",)  # tied output projection
        if not names or any(name not in self.model_file.tensors for name in names):
            raise ImatrixError(f"{self.model_file.path}: no tensor for '{param}'")
        return names

    def values(self, param: str, names: tuple[str, ...], round_to_f16: bool, dtype: torch.dtype = torch.float32,
               in_place: bool = False, keep_file_row_order: bool = False) -> torch.Tensor:
        """The checkpoint tensor made of GGUF tensors `names`, as a `dtype` tensor of its own.

        A single 16-bit tensor asked for in its own dtype is taken from the file as is, without a
        float32 pass: with `in_place`, as a view of the mmap unless its values must change, else as a
        copy. With `keep_file_row_order`, llama's q/k rows stay in the file's order (the caller puts
        them in order when widening, `models.storage`).
        """
        if param in self.expert_stacks:
            stacks = [self._converted(name, round_to_f16) for name in names]
            joined = self.architecture.expert_join.join(stacks)
            return torch.from_numpy(np.array(joined, dtype=np.float32, order="C")).to(dtype)
        if (index := self.architecture.stacked_slice(param)) is not None:
            matrix = self._converted(names[0], round_to_f16)[index]
            return torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).to(dtype)
        if len(names) > 1:
            fused = next(f for f in self.architecture.fused if param.rpartition(".")[0].endswith(f".{f.module}"))
            parts = [self._converted(name, round_to_f16) for name in names]
            return torch.from_numpy(np.ascontiguousarray(fused.join(parts, self.config), dtype=np.float32)).to(dtype)
        return self._single(names[0], round_to_f16, dtype, in_place, keep_file_row_order)

    def _single(self, name: str, round_to_f16: bool, dtype: torch.dtype, in_place: bool,
                keep_file_row_order: bool) -> torch.Tensor:
        info = self.model_file.tensors[name]
        n_head = self.architecture.permuted_heads(self.config, name)
        if exact_16_bit_dtype(info.tensor_type) == dtype and not self.architecture.has_value_rules(name):
            weight = self.model_file.raw(name).view(np.uint16).reshape(info.shape)  # the bit patterns as stored
            if mapped_in_place(info, dtype, in_place) and (not n_head or keep_file_row_order):
                return torch.from_numpy(weight).view(dtype)
            if n_head:
                weight = unpermute_rows(weight, n_head)
            return torch.from_numpy(np.array(weight, order="C")).view(dtype)
        weight = self._converted(name, round_to_f16)
        return torch.from_numpy(np.array(weight, order="C")).to(dtype)  # own copy, not the mmap

    def _converted(self, name: str, round_to_f16: bool) -> np.ndarray:
        """One GGUF tensor as float32 in checkpoint layout (not yet joined with others)."""
        info = self.model_file.tensors[name]
        weight = self.model_file.tensor_f32(name)
        if round_to_f16 and info.tensor_type != gguf.GGMLQuantizationType.F32:
            weight = weight.astype(np.float16).astype(np.float32)
        n_head = self.architecture.permuted_heads(self.config, name)
        if n_head:
            weight = unpermute_rows(weight, n_head)
        return self.architecture.convert_tensor(weight, self.config, name)


def mapped_in_place(info: TensorInfo, dtype: torch.dtype, in_place: bool) -> bool:
    """Whether a tensor can be used as a view of the mapped file: its 16-bit values, 2-byte aligned."""
    return in_place and exact_16_bit_dtype(info.tensor_type) == dtype and info.offset % 2 == 0  # GGUF aligns to 32


# 3-D expert parameter -> the per-expert checkpoint matrices it concatenates (gate rows, then up rows)
_FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",), "down_proj": ("down_proj",)}


class SafetensorsWeights:
    """Tensors of a Hugging Face checkpoint directory, read one at a time from its shards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.handles = {path: _open_safetensors(path) for path in sorted(directory.glob("*.safetensors"))}
        if not self.handles:
            raise ImatrixError(f"{directory}: no *.safetensors weights found")
        self.where = {key: path for path, handle in self.handles.items() for key in handle.keys()}  # noqa: SIM118

    def tensor(self, param: str) -> torch.Tensor:
        if param in self.where:
            return self._get(param)
        if param == "lm_head.weight" and "model.embed_tokens.weight" in self.where:
            return self._get("model.embed_tokens.weight")  # tied output projection
        module, _, kind = param.rpartition(".")
        if kind in _FUSED_EXPERTS and f"{module}.0.down_proj.weight" in self.where:
            return self._fused_experts(module, _FUSED_EXPERTS[kind])
        if f"{param}_blocks" in self.where:  # MXFP4 experts (gpt-oss), dequantized as transformers loads them
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            return convert_moe_packed_tensors(self._get(f"{param}_blocks"), self._get(f"{param}_scales"),
                                              dtype=torch.float32)
        raise ImatrixError(f"{self.directory}: no tensor for '{param}' in its safetensors files")

    def _get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)

    def _fused_experts(self, module: str, parts: tuple[str, ...]) -> torch.Tensor:
        """transformers' 3-D expert parameter from a checkpoint that stores each expert apart."""
        n_expert = sum(1 for key in self.where if key.startswith(f"{module}.") and key.endswith(".down_proj.weight"))
        stacks = [torch.stack([self._get(f"{module}.{expert}.{part}.weight") for expert in range(n_expert)])
                  for part in parts]
        return torch.cat(stacks, dim=1)

    def n_values(self) -> int:
        return sum(int(np.prod(handle.get_slice(key).get_shape()))
                   for handle in self.handles.values() for key in handle.keys())  # noqa: SIM118


def _open_safetensors(path: Path):  # noqa: ANN202 - safetensors' handle type is not importable
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise ImatrixError(f"{path}: cannot read safetensors file ({exc})") from exc
