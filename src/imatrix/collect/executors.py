"""How the model is executed for a window of batches (kept apart from what is measured).

An executor turns batches of chunks into final (normed) hidden states and lends the output
projection; the runner decides what to project and score. `InMemoryExecutor` holds the whole model;
`imatrix.collect.sequential.SequentialExecutor` loads one layer at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from imatrix.collect.moe import expert_targets
from imatrix.models.loader import LoadedModel


class Executor(Protocol):
    loaded: LoadedModel
    device: torch.device
    window_chunks: int  # chunks it prefers per window; 0: one batch at a time

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def output_head(self) -> AbstractContextManager[torch.nn.Module]: ...


# On CPU, at most this many sequences per forward: two 512-token chunks per forward collect 6–12%
# faster than one (the 16-bit weights are widened and read once for both, the matmuls are taller);
# three or four only grew the peak RSS (SmolLM2 with perplexity: 0.64 and 0.72 GB against 0.60), for
# no speed-up measurable on the benchmarks' VM. The hooks add each sequence's sums on its own
# (`collect.hooks`), so the statistics do not depend on the split as long as a sequence's activations
# do not either: with MKL's AVX-512 sgemm, the same bits at -b 512, 1024 and 2048 for SmolLM2. A sgemm
# that rounds a row differently in a taller matrix (MKL's AVX2 kernels on small ones) moves the last bits.
CPU_SEQS_PER_FORWARD = 2


def cpu_seqs_per_forward(loaded: LoadedModel) -> int:
    """Sequences per forward on the CPU: one for a MoE model, whose routers and experts see the tokens
    of a forward's sequences flattened together (summed as one block, their sums would depend on -b)."""
    return 1 if expert_targets(loaded.model) else CPU_SEQS_PER_FORWARD


class InMemoryExecutor:
    window_chunks = 0

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.device = next(loaded.model.parameters()).device
        # on other devices the whole batch goes through at once
        self.seqs_per_forward = cpu_seqs_per_forward(loaded) if self.device.type == "cpu" else 0

    def hidden_states(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.seqs_per_forward:
            return [torch.cat([forward_in_memory(self.loaded, part) for part in batch.split(self.seqs_per_forward)])
                    for batch in batches]
        return [forward_in_memory(self.loaded, batch) for batch in batches]

    @contextmanager
    def output_head(self) -> Iterator[torch.nn.Module]:
        yield self.loaded.lm_head


def forward_in_memory(loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states `[n_seq, n_ctx, d_model]` of one batch of chunks.

    The output projection is not run here: the runner applies it per sequence, only where it is
    needed (perplexity, or --process-output), which keeps one chunk's logits in memory at a time.
    """
    return loaded.decoder(input_ids=batch, use_cache=False).last_hidden_state
