"""Layer-by-layer execution for models larger than memory (`--sequential`).

The model is a skeleton on the meta device. A window of batches goes through it one decoder layer at a
time: each layer is loaded (dequantized from the mmapped GGUF, or read from the safetensors files through
transformers' own checkpoint conversions), every batch goes through it, and it is freed again. Peak memory
is about one layer plus the window's activations. The measuring hooks sit on the skeleton's modules, which
stay the same objects while their parameters come and go, so `ActivationCollector` works unchanged.

What runs around the layers is the decoder's own forward, whatever it does there (embeddings, per-layer
inputs, masks, rotary tables, state that layers share, what follows the last layer): each forward runs in
a thread of its own and waits before each layer until that layer is loaded. The threads take turns, one
at a time, in a fixed order, so the run is as deterministic as in memory. The decoder's modules outside
its layers are loaded for the step that needs them and freed when every forward has taken it: all of them
before the first layer (a forward may read the embeddings' device before calling them), those not used
there (the final norm, …) after the last layer, and any that is called elsewhere when it is called. A
waiting forward holds its own local tensors: its input embeddings besides the hidden states, about one
hidden-state tensor more per chunk than the layer's input.
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.models.loader import LoadedModel, loaded_from
from imatrix.models.open import OpenedModel
from imatrix.models.storage import storage_dtype
from imatrix.models.weights import shaped_as
from imatrix.pipeline.executors import cpu_seqs_per_forward

# in memory only if the weights take at most this share of what is available: the rest is for
# activations, logits and the allocator's slack
MEMORY_HEADROOM = 0.8


class _Cancelled(BaseException):
    """Raised in a waiting forward to unwind it: the window failed elsewhere (not an `Exception`, so that
    no handler in the model's code takes it)."""


class _PausingForward(threading.Thread):
    """One forward of the decoder in a thread of its own, which waits at each layer boundary (`pause`) until
    the executor lets it go on (`advance`). The thread runs in the caller's grad and inference modes, on
    the caller's current CUDA device (all three are per thread)."""

    def __init__(self, forward: Callable[[], torch.Tensor]) -> None:
        super().__init__(name="imatrix-sequential", daemon=True)
        self._forward = forward
        self._inference, self._grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self._resume, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self._cancelled = False
        self.at: int | None = None  # the boundary it waits at: layer i before layer i runs; None once done
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self._cuda_device is not None:
                torch.cuda.set_device(self._cuda_device)
            with torch.inference_mode(self._inference), torch.set_grad_enabled(self._grad):
                self.result = self._forward()
        except _Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised again in the executor's thread
            self.error = exc
        finally:
            self.at = None
            self._paused.release()

    def pause(self, boundary: int) -> None:
        """(In this forward's thread.) Wait at `boundary` until advanced."""
        self.at = boundary
        self._paused.release()
        self._resume.acquire()
        if self._cancelled:
            raise _Cancelled

    def advance(self) -> int | None:
        """Let the forward run to its next boundary; the boundary (None: it has finished)."""
        if self.ident is None:
            self.start()
        else:
            self._resume.release()
        self._paused.acquire()
        if self.error is not None:
            raise self.error
        return self.at

    def cancel(self) -> None:
        if self.is_alive():
            self._cancelled = True
            self._resume.release()
            self.join()


class SequentialExecutor:
    """Runs a window of batches through the model one decoder layer at a time."""

    def __init__(self, opened: OpenedModel, device: torch.device, dtype: torch.dtype, window_chunks: int = 64) -> None:
        self.loaded: LoadedModel = loaded_from(opened, opened.skeleton)
        self.weights, self.device, self.dtype = opened.weights, device, dtype
        self.window_chunks = window_chunks  # chunks whose activations are held while a layer is loaded
        # as in memory
        self.sequences_per_forward = cpu_seqs_per_forward(self.loaded) if device.type == "cpu" else 0
        decoder = self.loaded.decoder
        self._names = {module: name for name, module in self.loaded.model.named_modules()}
        layer_list = decoder_layer_list(decoder, self.loaded.config.num_hidden_layers)
        self._layers = list(layer_list[: self.loaded.config.num_hidden_layers])  # NextN/MTP blocks may follow
        in_layers = set(layer_list.modules())
        # the decoder's modules that hold weights of their own outside the layers
        self._outside = [module for module in decoder.modules() if module not in in_layers and _own_state(module)]
        self._loaded: list[torch.nn.Module] = []  # outside modules loaded for the current step
        self._called: list[torch.nn.Module] = []  # outside modules called in the current step

    def chunks_in_flight(self, requested: int) -> int:
        """One: the forwards of a window already take turns at each layer."""
        return 1

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final (normed) hidden states of each batch, as `forward_in_memory` returns them."""
        parts = [batch.split(self.sequences_per_forward) if self.sequences_per_forward else (batch,)
                 for batch in batches]
        forwards = [_PausingForward(partial(_last_hidden_state, self.loaded.decoder, part))
                    for batch_parts in parts for part in batch_parts]
        try:
            with self._pausing_at_layers(), self._loading_outside_modules():
                self._advance(forwards, 0, self._outside)  # to the first layer
                used_before = list(self._called)
                for index, layer in enumerate(self._layers):
                    with self._weights_of(layer):
                        self._advance(forwards, index + 1)  # through layer `index`, to the next boundary
                # what follows the last layer
                self._advance(forwards, None, [module for module in self._outside if module not in used_before])
        finally:
            for forward in forwards:
                forward.cancel()
        if any(forward.result.is_meta for forward in forwards):
            raise ImatrixError(self._unsupported("its forward reads weights of modules outside its layers that it "
                                                 "does not call"))
        results = iter(forward.result for forward in forwards)
        return [torch.cat([next(results) for _ in batch_parts]) for batch_parts in parts]

    @contextmanager
    def output_head(self) -> Iterator[torch.nn.Module]:
        head = self.loaded.lm_head
        with self._weights_of(head):
            yield head

    def _advance(self, forwards: list[_PausingForward], boundary: int | None,
                 preload: list[torch.nn.Module] = ()) -> None:
        """Every forward one step on, to `boundary`, with the outside modules `preload` (and any other that
        is called) loaded; they are freed after the step."""
        try:
            for module in preload:
                self._load_outside(module)
            self._called.clear()
            for forward in forwards:
                reached = forward.advance()
                if reached != boundary:
                    raise ImatrixError(self._unsupported(self._out_of_order(boundary, reached)))
        finally:
            for module in self._loaded:
                _free(module, recurse=False)
            self._loaded.clear()

    def _load_outside(self, module: torch.nn.Module) -> None:
        if module not in self._loaded:
            self._load(module, recurse=False)
            self._loaded.append(module)

    def _out_of_order(self, expected: int | None, reached: int | None) -> str:
        if reached is None:
            return f"its forward returned before layer {expected}"
        if expected is None:
            return f"its forward called layer {reached} again after the last one"
        if reached == len(self._layers):
            return f"its forward skipped layer {expected}"
        return f"its forward called layer {reached} where layer {expected} was due"

    def _unsupported(self, why: str) -> str:
        return f"--sequential is not supported for {self.loaded.architecture.gguf_name} models: {why}"

    @contextmanager
    def _pausing_at_layers(self) -> Iterator[None]:
        """Each forward waits before each layer, and after the last one."""

        def pause_before(boundary: int) -> Callable[..., None]:
            return lambda module, args, kwargs: _current_forward().pause(boundary)

        handles = [layer.register_forward_pre_hook(pause_before(index), with_kwargs=True)
                   for index, layer in enumerate(self._layers)]
        boundary_after = len(self._layers)
        handles.append(self._layers[-1].register_forward_hook(
            lambda module, args, output: _current_forward().pause(boundary_after)))
        with _removed_after(handles):
            yield

    @contextmanager
    def _loading_outside_modules(self) -> Iterator[None]:
        """An outside module is loaded when it is called, if it is not yet."""

        def load(module: torch.nn.Module, args: tuple) -> None:
            self._load_outside(module)
            if module not in self._called:
                self._called.append(module)

        with _removed_after([module.register_forward_pre_hook(load) for module in self._outside]):
            yield

    @contextmanager
    def _weights_of(self, module: torch.nn.Module) -> Iterator[None]:
        self._load(module, recurse=True)
        try:
            yield
        finally:
            _free(module, recurse=True)

    def _load(self, module: torch.nn.Module, recurse: bool) -> None:
        """`module`'s parameters and buffers from the weight source, in the shapes the module has."""
        prefix = f"{self._names[module]}."
        expected = _state_of(module, recurse)
        state = {name: shaped_as(self.weights.tensor(prefix + name), empty.shape, prefix + name, self.loaded.source)
                 .to(device=self.device, dtype=self.dtype if empty.is_floating_point() else empty.dtype)
                 for name, empty in expected.items()}
        module.load_state_dict(state, strict=recurse, assign=True)


def decoder_layer_list(decoder: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    """The decoder's list of layers: its one list of at least `n_layers` transformers decoder layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lists = [child for child in decoder.children() if isinstance(child, torch.nn.ModuleList) and len(child) >= n_layers
             and all(isinstance(layer, GradientCheckpointingLayer) for layer in child)]
    if len(lists) != 1:
        raise ImatrixError(f"--sequential: cannot tell the decoder layers of {type(decoder).__name__} "
                           f"({len(lists)} lists of decoder layers)")
    return lists[0]


def _last_hidden_state(decoder: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return decoder(input_ids=batch, use_cache=False).last_hidden_state


def _current_forward() -> _PausingForward:
    forward = threading.current_thread()
    if not isinstance(forward, _PausingForward):
        raise ImatrixError("--sequential: a decoder layer was called outside the executor's forwards")
    return forward


def _state_of(module: torch.nn.Module, recurse: bool) -> dict[str, torch.Tensor]:
    """`module`'s state-dict entries: all of them, or only those it holds itself (not its children's)."""
    return {name: tensor for name, tensor in module.state_dict(keep_vars=True).items() if recurse or "." not in name}


def _own_state(module: torch.nn.Module) -> bool:
    return bool(_state_of(module, recurse=False))


def _free(module: torch.nn.Module, recurse: bool) -> None:
    """Back to the meta device: its state-dict entries only (buffers no checkpoint holds, rotary tables and
    embedding scales, stay where they were built)."""
    empty = {name: tensor.to("meta") for name, tensor in _state_of(module, recurse).items()}
    module.load_state_dict(empty, strict=False, assign=True)


def weight_bytes(opened: OpenedModel, dtype: torch.dtype) -> int:
    """Bytes the model's weights take in memory on the in-memory path computing in `dtype`."""
    model_file = opened.model_file
    if model_file is None:
        return opened.weights.n_values() * dtype.itemsize
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


def should_run_sequentially(opened: OpenedModel, device: torch.device, dtype: torch.dtype) -> bool:
    return weight_bytes(opened, dtype) > MEMORY_HEADROOM * available_memory(device)


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


@contextmanager
def _removed_after(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
