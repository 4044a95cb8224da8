"""Layer-by-layer execution for models larger than memory (`--sequential`).

The model is a skeleton on the meta device. For a window of chunks, the embeddings are loaded, every
chunk is embedded, and the embeddings are freed; then each decoder layer in turn is loaded (dequantized
from the mmapped GGUF, or read from safetensors), every chunk's hidden states go through it, and it
is freed again. Peak memory is about one layer plus the window's activations. The measuring hooks sit
on the skeleton's modules, which stay the same objects while their parameters come and go, so
`ActivationCollector` works unchanged.

The arguments a decoder layer needs (rotary position embeddings, causal masks, per-layer attention
kinds) are the model's own: the decoder's forward runs once per batch with its layers swapped for
stand-ins that record what they are called with and pass the hidden states through.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.loader import LoadedModel, loaded_from
from imatrix.models.open import OpenedModel
from imatrix.models.storage import storage_dtype
from imatrix.models.weights import SafetensorsWeights

# in memory only if the weights take at most this share of what is available: the rest is for
# activations, logits and the allocator's slack
MEMORY_HEADROOM = 0.8


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

    def __init__(self, opened: OpenedModel, device: torch.device, dtype: torch.dtype, window_chunks: int = 64) -> None:
        self.loaded: LoadedModel = loaded_from(opened, opened.skeleton)
        self.weights, self.device, self.dtype = opened.weights, device, dtype
        self.window_chunks = window_chunks  # chunks whose activations are held while a layer is loaded

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final (normed) hidden states of each batch, as `forward_in_memory` returns them."""
        inner = self.loaded.decoder
        with self._weights_of(inner.embed_tokens):
            prepared = [self._prepare(batch) for batch in batches]
        for index, layer in enumerate(inner.layers[: self.loaded.config.num_hidden_layers]):
            with self._weights_of(layer):
                for batch in prepared:
                    batch.hidden = _tensor_out(layer(batch.hidden, **batch.layer_kwargs[index]))
        with self._weights_of(inner.norm):
            return [inner.norm(batch.hidden) for batch in prepared]

    @contextmanager
    def output_head(self) -> Iterator[torch.nn.Module]:
        head = self.loaded.lm_head
        with self._weights_of(head):
            yield head

    def _prepare(self, batch: torch.Tensor) -> _Batch:
        inner = self.loaded.decoder
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
    def _weights_of(self, module: torch.nn.Module) -> Iterator[None]:
        prefix = next(f"{name}." for name, found in self.loaded.model.named_modules() if found is module)
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
