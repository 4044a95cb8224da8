"""Where a model's weights come from, one checkpoint parameter at a time, in checkpoint layout.

`GGUFWeights` undoes what llama.cpp's converter did (the adapter's rules, q/k row order, fused and
expert tensors) on tensors dequantized from the mmapped file; 16-bit tensors can be handed out as
views of the file itself. `SafetensorsWeights` reads a Hugging Face checkpoint's shards and makes
each parameter from them as transformers' `from_pretrained` does (its checkpoint conversions).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
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


def shaped_as(tensor: torch.Tensor, shape: torch.Size, param: str, source: object) -> torch.Tensor:
    """A weight source's tensor for `param` in the shape the model's parameter has: GGUF drops unit dimensions
    (Qwen2-MoE's ffn_gate_inp_shexp is [n_embd], the Linear's weight [1, n_embd]; Mamba's A_log, D)."""
    if tensor.numel() != shape.numel():
        raise ImatrixError(f"{source}: tensor for '{param}' has shape {tuple(tensor.shape)}, the model expects "
                           f"{tuple(shape)}")
    return tensor.reshape(shape)


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
        stored = exact_16_bit_dtype(info.tensor_type)
        if stored is not None and not self.architecture.has_value_rules(name):
            weight = self.model_file.raw(name).view(np.uint16).reshape(info.shape)  # the bit patterns as stored
            if stored == dtype:
                if mapped_in_place(info, dtype, in_place) and (not n_head or keep_file_row_order):
                    return torch.from_numpy(weight).view(dtype)
                if n_head:
                    weight = unpermute_rows(weight, n_head)
                return torch.from_numpy(np.array(weight, order="C")).view(dtype)
            if stored == torch.float16 or not round_to_f16:
                # one exact widening or rounding pass from the stored bits (through float32 it is the same
                # value: both round once, to nearest even), rather than a float32 copy converted again
                if n_head:
                    weight = unpermute_rows(weight, n_head)
                return torch.from_numpy(np.ascontiguousarray(weight)).view(stored).to(dtype)
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


# The text model of a multimodal checkpoint (Gemma 3, Mistral 3, Llama 4, Qwen3.5, …), as llama.cpp's converter
# takes it: `ModelBase.filter_tensors` drops `language_model.` from every name, so `model.language_model.layers.0.…`
# (transformers 5's layout) and `language_model.model.layers.0.…` (the published one) are the text model's
# `model.layers.0.…`, and `language_model.lm_head.weight` its `lm_head.weight`; the other towers' tensors (vision,
# audio, projector) are not the text model's. As a key mapping of transformers' loading (`from_pretrained`'s).
TEXT_MODEL_KEYS = {r"language_model\.": ""}


@dataclass
class _Conversion:
    """Checkpoint tensors that one of transformers' `WeightConverter`s turns into parameters (stacked experts,
    a router renamed and a fused projection split, …), as `from_pretrained` groups them."""

    converter: Any  # transformers.core_model_loading.WeightConverter, the template (copied for each use)
    first: str  # the first parameter it makes: the group's name in `from_pretrained`
    sources: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, the source pattern it matched)


class SafetensorsWeights:
    """Tensors of a Hugging Face checkpoint directory, read one at a time from its shards.

    Given the model they are for (`model`, a skeleton is enough), a parameter is made from the checkpoint
    as `from_pretrained` makes it: through transformers' conversion mapping for that model (renamed keys,
    per-expert matrices stacked, fused tensors split), after `key_mapping` (`TEXT_MODEL_KEYS`: the text model
    of a multimodal checkpoint).
    """

    def __init__(self, directory: Path, model: torch.nn.Module | None = None,
                 key_mapping: dict[str, str] | None = None) -> None:
        self.directory, self.model, self.key_mapping = directory, model, key_mapping
        self._conversions: dict[str, _Conversion | str] | None = None  # parameter -> how it is made
        self._converted: dict[str, torch.Tensor] = {}  # made with another one asked for, not asked for yet
        self.handles = {path: _open_safetensors(path) for path in sorted(directory.glob("*.safetensors"))}
        if not self.handles:
            raise ImatrixError(f"{directory}: no *.safetensors weights found")
        self.where = {key: path for path, handle in self.handles.items() for key in handle.keys()}  # noqa: SIM118
        self.stored_as = {renamed: key for key in self.where
                          if (renamed := _renamed(key, key_mapping or {})) != key}  # parameter -> its key
        self.where.update({alias: self.where[key] for alias, key in self.stored_as.items()})

    def tensor(self, param: str) -> torch.Tensor:
        made_as = self._conversion_of(param)
        if isinstance(made_as, str):
            return self._stored(made_as)
        if made_as is not None:
            return self._convert(param, made_as)
        if param in self.where:
            return self._get(param)
        if f"{param}_blocks" in self.where:  # MXFP4 experts (gpt-oss), dequantized as transformers loads them
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            return convert_moe_packed_tensors(self._get(f"{param}_blocks"), self._get(f"{param}_scales"),
                                              dtype=torch.float32)
        raise ImatrixError(f"{self.directory}: no tensor for '{param}' in its safetensors files")

    def _conversion_of(self, param: str) -> _Conversion | str | None:
        """How transformers makes `param` from this checkpoint: a checkpoint key (stored as is or renamed), a
        conversion, or None (no model given, or not from any key)."""
        if self.model is None:
            return None
        if self._conversions is None:
            self._conversions = _conversions(self.model, [key for handle in self.handles.values()
                                                          for key in handle.keys()], self.key_mapping)  # noqa: SIM118
        made_as = self._conversions.get(param)
        tied = getattr(self.model, "_tied_weights_keys", None)
        if made_as is None and isinstance(tied, dict) and param in tied:
            made_as = self._conversions.get(tied[param])  # an output projection tied to the embeddings
        return made_as

    def _convert(self, param: str, conversion: _Conversion) -> torch.Tensor:
        if param in self._converted:
            return self._converted.pop(param)
        converter = copy.deepcopy(conversion.converter)
        for key, pattern in conversion.sources:
            converter.add_tensor(conversion.first, key, pattern, lambda key=key: self._stored(key))
        made = {name: made[0] if isinstance(made, list) else made for name, made in
                converter.convert(conversion.first, model=self.model, config=self.model.config).items()}
        if param not in made:
            raise ImatrixError(f"{self.directory}: transformers' conversion of {conversion.first} did not make "
                               f"'{param}'")
        self._converted.update((name, tensor) for name, tensor in made.items() if name != param)
        return made[param]

    def _stored(self, key: str) -> torch.Tensor:
        """A checkpoint tensor by its key as stored, float32."""
        return self.handles[self.where[key]].get_tensor(key).float()

    def _get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(self.stored_as.get(key, key))

    def n_values(self) -> int:
        return sum(int(np.prod(handle.get_slice(key).get_shape()))
                   for handle in self.handles.values() for key in handle.keys())  # noqa: SIM118


def _renamed(key: str, key_mapping: dict[str, str]) -> str:
    for pattern, replacement in key_mapping.items():
        key = re.sub(pattern, replacement, key, count=1)
    return key


def _conversions(model: torch.nn.Module, keys: list[str],
                 key_mapping: dict[str, str] | None = None) -> dict[str, _Conversion | str]:
    """Parameter of `model` -> the checkpoint key it is loaded from, or the conversion that makes it, as
    transformers' `from_pretrained` renames and groups checkpoint keys (`convert_and_load_state_dict_in_model`),
    `key_mapping` first."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model, key_mapping)
    converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
    renamings = [transform for transform in transforms if not isinstance(transform, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    params = model.state_dict()
    made_as: dict[str, _Conversion | str] = {}
    for key in sorted(keys, key=dot_natural_key):  # the order experts are stacked in
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
        if renamed not in params and key in params:
            renamed, pattern = key, None
        if renamed not in params:
            continue  # not loaded (multi-token prediction blocks, unused buffers)
        if pattern is None:
            made_as[renamed] = key
            continue
        converter = by_pattern[pattern]
        conversion = made_as.get(renamed)
        if not isinstance(conversion, _Conversion):
            conversion = _Conversion(converter, renamed)
            for target in converter.target_patterns:
                made_as[renamed.replace(converter.target_patterns[0], target)] = conversion
        conversion.sources.append((key, pattern))
    return made_as


def _open_safetensors(path: Path):  # noqa: ANN202 - safetensors' handle type is not importable
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise ImatrixError(f"{path}: cannot read safetensors file ({exc})") from exc
