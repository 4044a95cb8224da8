"""How the model is executed for a window of batches, kept apart from what is measured.

An executor turns batches of chunks into final (normed) hidden states and lends the output
projection; the consumers (`pipeline.runner.Consumer`) decide what to project and measure.
`InMemoryExecutor` holds the whole model; `pipeline.sequential.SequentialExecutor` loads one layer at
a time. `open_executor` picks one for a model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import torch

from imatrix.errors import ImatrixError
from imatrix.models.loader import LoadedModel, load_model
from imatrix.pipeline.in_flight import default_chunks_in_flight
from imatrix.reporter import SILENT, Reporter


class Executor(Protocol):
    loaded: LoadedModel
    device: torch.device
    window_chunks: int  # chunks it prefers per window; 0: one batch at a time
    sequences_per_forward: int  # sequences of a batch it runs per forward; 0: the whole batch at once

    def chunks_in_flight(self, requested: int) -> int:
        """Chunks it runs at once, each in its own thread, when `requested` are (0: its default); 1: one at a
        time."""
        ...

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Final (normed) hidden states `[n_seq, n_ctx, d_model]` of each batch of token ids `[n_seq, n_ctx]`."""
        ...

    def output_head(self) -> AbstractContextManager[torch.nn.Module]:
        """The output projection, usable inside the block."""
        ...


# On CPU, at most this many sequences per forward: two 512-token chunks per forward collect faster than
# one (the 16-bit weights are widened and read once for both, the matmuls are taller); three or four only
# grew the peak RSS, for no speed-up measurable on the benchmarks' VM (docs/benchmarks.md). The hooks add
# each sequence's sums on its own (`collection.hooks`), so the statistics do not depend on the split as long
# as a sequence's activations do not either: with MKL's AVX-512 sgemm, the same bits at -b 512, 1024 and 2048
# for SmolLM2. A sgemm that rounds a row differently in a taller matrix (MKL's AVX2 kernels on small ones)
# moves the last bits.
CPU_SEQS_PER_FORWARD = 2


def cpu_seqs_per_forward(loaded: LoadedModel) -> int:
    """Sequences per forward on the CPU: one for a MoE model, whose routers and experts see the tokens
    of a forward's sequences flattened together (summed as one block, their sums would depend on -b)."""
    return 1 if loaded.is_moe else CPU_SEQS_PER_FORWARD


class InMemoryExecutor:
    window_chunks = 0

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.device = next(loaded.model.parameters()).device
        # on other devices the whole batch goes through at once
        self.sequences_per_forward = cpu_seqs_per_forward(loaded) if self.device.type == "cpu" else 0

    def chunks_in_flight(self, requested: int) -> int:
        """Several only on the CPU, where one forward does not keep the cores busy (`pipeline.in_flight`)."""
        if self.device.type != "cpu":
            return 1
        return requested or default_chunks_in_flight(torch.get_num_threads())

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        per_forward = self.sequences_per_forward
        if per_forward:
            return [torch.cat([forward_in_memory(self.loaded, part) for part in batch.split(per_forward)])
                    for batch in batches]
        return [forward_in_memory(self.loaded, batch) for batch in batches]

    @contextmanager
    def output_head(self) -> Iterator[torch.nn.Module]:
        yield self.loaded.lm_head


def forward_in_memory(loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states `[n_seq, n_ctx, d_model]` of one batch of chunks.

    The output projection is not run here: the consumers apply it per sequence, only where it is
    needed (perplexity, or --process-output), which keeps one chunk's logits in memory at a time.
    """
    return loaded.decoder(input_ids=batch, use_cache=False).last_hidden_state


def open_executor(model: str | Path | LoadedModel | Executor, device: torch.device, dtype: torch.dtype,
                  sequential: bool | None = None, window_chunks: int = 64, round_to_f16: bool = False,
                  reporter: Reporter = SILENT) -> Executor:
    """The executor for `model` (a path, a loaded model, or an executor, taken as it is): the whole model in
    memory, or one layer at a time when `sequential` says so (None: when the weights would not fit)."""
    if isinstance(model, LoadedModel):
        return InMemoryExecutor(model)
    if not isinstance(model, str | Path):
        return model
    from imatrix.models.open import open_model
    from imatrix.pipeline import sequential as layer_by_layer

    path = Path(model)
    start = time.perf_counter()
    opened = open_model(path, device)
    if sequential is None:
        sequential = layer_by_layer.should_run_sequentially(opened, device, dtype)
        if sequential:
            reporter.info(f"load_model: {path}'s weights would not fit in memory: running layer by layer "
                          "(--sequential)")
    if sequential and round_to_f16:
        raise ImatrixError("--round-to-f16 rounds the weights of a model loaded whole: not with --sequential")
    if sequential:
        executor: Executor = layer_by_layer.SequentialExecutor(opened, device, dtype, window_chunks)
    else:
        executor = InMemoryExecutor(load_model(opened, device=device, dtype=dtype, round_to_f16=round_to_f16))
    reporter.info(f"load_model: loaded {path} in {time.perf_counter() - start:.2f} s")
    return executor


def resolve_device(device: str | torch.device, n_gpu_layers: int | None = None) -> torch.device:
    """The device `--device` (auto, cpu, cuda, cuda:N) and llama.cpp's `-ngl` ask for: -ngl 0 forces the CPU,
    auto is the GPU if there is one."""
    if isinstance(device, torch.device):
        return device
    if device == "cpu" or n_gpu_layers == 0:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        raise ImatrixError(f"--device {device} requested but no CUDA device is available")
    chosen = torch.device(device)
    if chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ImatrixError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    return chosen
