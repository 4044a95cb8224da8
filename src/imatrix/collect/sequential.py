"""Layer-by-layer execution for models larger than memory (`--sequential`).

The model is a skeleton on the meta device. For a window of chunks, the embeddings are loaded, every
chunk is embedded, and the embeddings are freed; then each decoder layer in turn is loaded (dequantized
from the mmapped GGUF, or read from safetensors), every chunk's hidden states go through it, and it
is freed again. Peak memory is about one layer plus the window's activations. The measuring hooks sit
on the skeleton's modules, which stay the same objects while their parameters come and go, so
`ActivationCollector` works unchanged.

The arguments a decoder layer needs (rotary position embeddings, causal masks, per-layer attention
kinds) are the model's own: `model.model.forward` runs once per batch with its layers swapped for
stand-ins that record what they are called with and pass the hidden states through.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.models.gguf_reader import GGUFModelFile
from imatrix.models.loader import (
    LoadedModel,
    empty_model,
    expert_stack_map,
    gguf_expert_tensor,
    gguf_name_map,
    gguf_tensor,
    hf_architecture,
    rebuild_meta_buffers,
)
from imatrix.models.storage import storage_dtype
from imatrix.models.tokenizer import tokenizer_from_gguf

# in memory only if the weights take at most this share of what is available: the rest is for
# activations, logits and the allocator's slack
MEMORY_HEADROOM = 0.8

# 3-D expert parameter -> the per-expert checkpoint matrices it concatenates (gate rows, then up rows)
_FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",), "down_proj": ("down_proj",)}


class WeightSource(Protocol):
    def tensor(self, param: str) -> torch.Tensor:
        """One checkpoint tensor by parameter name (`model.layers.0.mlp.up_proj.weight`), on the host."""
        ...


@dataclass
class GGUFWeights:
    model_file: GGUFModelFile
    loaded: LoadedModel

    def tensor(self, param: str) -> torch.Tensor:
        stacks = self.loaded.expert_stacks.get(param)
        if stacks is not None:
            tensor = gguf_expert_tensor(self.model_file, stacks, False)
            for name in stacks:
                self.model_file.release_pages(name)
            return tensor
        name = self.loaded.gguf_names.get(param)
        if param == "lm_head.weight" and name not in self.model_file.tensors:
            name = "token_embd.weight"  # tied output projection
        if name is None or name not in self.model_file.tensors:
            raise ImatrixError(f"{self.model_file.path}: no tensor for '{param}'")
        tensor = gguf_tensor(self.model_file, self.loaded.architecture, self.loaded.config, name, False)
        self.model_file.release_pages(name)
        return tensor


class SafetensorsWeights:
    """Tensors of a Hugging Face checkpoint directory, read one at a time from its shards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.handles = {path: _open_safetensors(path) for path in sorted(directory.glob("*.safetensors"))}
        self.where = {key: path for path, handle in self.handles.items() for key in handle.keys()}  # noqa: SIM118

    def tensor(self, param: str) -> torch.Tensor:
        if param in self.where:
            return self._get(param)
        if param == "lm_head.weight" and "model.embed_tokens.weight" in self.where:
            return self._get("model.embed_tokens.weight")  # tied output projection
        module, _, kind = param.rpartition(".")
        if kind in _FUSED_EXPERTS and f"{module}.0.down_proj.weight" in self.where:
            return self._fused_experts(module, _FUSED_EXPERTS[kind])
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


def open_lazy_model(path: str | Path, device: str | torch.device) -> tuple[LoadedModel, WeightSource]:
    """A model skeleton on the meta device (rotary tables on `device`) and where its weights are."""
    source = Path(path)
    if source.is_dir():
        return _open_hf(source, device)
    from imatrix.models.architectures import architecture_for

    model_file = GGUFModelFile(source)
    architecture = architecture_for(model_file.architecture, source)
    config = architecture.build_config(model_file)
    model = _skeleton(empty_model(architecture, config), device)
    n_blocks = config.num_hidden_layers
    loaded = LoadedModel(model, tokenizer_from_gguf(model_file), architecture,
                         gguf_name_map(model, architecture, n_blocks), source,
                         expert_stack_map(model, architecture, n_blocks))
    return loaded, GGUFWeights(model_file, loaded)


def _open_hf(directory: Path, device: str | torch.device) -> tuple[LoadedModel, WeightSource]:
    import transformers

    from imatrix.models.hf_loader import HFTokenizer

    architecture = hf_architecture(directory)
    weights = SafetensorsWeights(directory)
    if not weights.handles:
        raise ImatrixError(f"{directory}: no *.safetensors weights found")
    config = getattr(transformers, architecture.config_class).from_pretrained(directory)
    model = _skeleton(empty_model(architecture, config), device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    wrapped = HFTokenizer(tokenizer, tokenizer.bos_token_id, bool(getattr(tokenizer, "add_bos_token", False)))
    names = gguf_name_map(model, architecture, config.num_hidden_layers)
    return LoadedModel(model, wrapped, architecture, names, directory), weights


def _skeleton(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    rebuild_meta_buffers(model, device)
    return model.eval()


class _LayerCalled(Exception):
    """Raised by the last stand-in: everything a layer needs has been recorded."""


class _StandIn(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, calls: list[dict[str, Any]], last: bool) -> None:
        super().__init__()
        self.calls, self.last = calls, last
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise ImatrixError("sequential execution: decoder layers called with positional arguments")
        self.calls.append({"hidden": hidden_states, "kwargs": kwargs})
        if self.last:
            raise _LayerCalled
        return hidden_states


@dataclass
class _Batch:
    hidden: torch.Tensor
    layer_kwargs: list[dict[str, Any]]


class SequentialExecutor:
    """Runs a window of batches through the model one decoder layer at a time."""

    def __init__(self, loaded: LoadedModel, weights: WeightSource, device: torch.device, dtype: torch.dtype,
                 window_chunks: int = 64) -> None:
        self.loaded, self.weights, self.device, self.dtype = loaded, weights, device, dtype
        self.window_chunks = window_chunks  # chunks whose activations are held while a layer is loaded

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final (normed) hidden states of each batch, as `forward_in_memory` returns them."""
        inner = self.loaded.model.model
        with self._weights_of(inner.embed_tokens, "model.embed_tokens."):
            prepared = [self._prepare(batch) for batch in batches]
        for index, layer in enumerate(inner.layers[: self.loaded.config.num_hidden_layers]):
            with self._weights_of(layer, f"model.layers.{index}."):
                for batch in prepared:
                    batch.hidden = _tensor_out(layer(batch.hidden, **batch.layer_kwargs[index]))
        with self._weights_of(inner.norm, "model.norm."):
            return [inner.norm(batch.hidden) for batch in prepared]

    @contextmanager
    def output_head(self) -> Iterator[torch.nn.Module]:
        head = self.loaded.model.lm_head
        with self._weights_of(head, "lm_head."):
            yield head

    def _prepare(self, batch: torch.Tensor) -> _Batch:
        inner = self.loaded.model.model
        layers = inner.layers
        n_layers = self.loaded.config.num_hidden_layers
        calls: list[dict[str, Any]] = []
        inner.layers = torch.nn.ModuleList(
            _StandIn(layer, calls, index == n_layers - 1) for index, layer in enumerate(layers[:n_layers]))
        try:
            inner(input_ids=batch, use_cache=False)
        except _LayerCalled:
            pass
        finally:
            inner.layers = layers
        if len(calls) != n_layers:
            raise ImatrixError(f"sequential execution: the model called {len(calls)} of {n_layers} layers")
        return _Batch(calls[0]["hidden"], [call["kwargs"] for call in calls])

    @contextmanager
    def _weights_of(self, module: torch.nn.Module, prefix: str) -> Iterator[None]:
        names = list(module.state_dict())
        state = {name: self.weights.tensor(prefix + name).to(device=self.device, dtype=self.dtype)
                 for name in names}
        module.load_state_dict(state, strict=True, assign=True)
        del state
        try:
            yield
        finally:
            module.to("meta")


def _tensor_out(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def weight_bytes(path: str | Path, dtype: torch.dtype) -> int:
    """Bytes the model's weights take in memory on the in-memory path computing in `dtype`."""
    source = Path(path)
    if source.is_dir():
        return SafetensorsWeights(source).n_values() * dtype.itemsize
    model_file = GGUFModelFile(source)
    total = 0
    for info in model_file.tensors.values():
        # matrices of 16-bit files stay 16-bit in memory (models.storage); expert stacks do not
        kept_as = storage_dtype(info.tensor_type, dtype) if len(info.ne) == 2 else dtype
        total += int(np.prod(info.ne)) * kept_as.itemsize
    return total


def available_memory(device: torch.device) -> int:
    """Bytes the process may still use on `device`: free GPU memory, or the host's available
    memory capped by an address-space rlimit or a cgroup limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    limits = [_host_available()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - _own_vm_size())
    cgroup = _cgroup_room()
    if cgroup is not None:
        limits.append(cgroup)
    return max(0, min(limits))


def should_run_sequentially(path: str | Path, device: torch.device, dtype: torch.dtype) -> bool:
    return weight_bytes(path, dtype) > MEMORY_HEADROOM * available_memory(device)


def _host_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits


def _own_vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def _open_safetensors(path: Path):  # noqa: ANN202 - safetensors' handle type is not importable
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise ImatrixError(f"{path}: cannot read safetensors file ({exc})") from exc
