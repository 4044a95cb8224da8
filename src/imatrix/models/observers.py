"""Inputs llama.cpp multiplies that no module of the checkpoint takes: measured by an adapter's observers.

llama.cpp's graph sometimes multiplies a weight by a value transformers' forward never hands to a
module: DeepSeek's multi-head latent attention multiplies the queries by `attn_k_b` and the attention
output, still in latent space, by `attn_v_b` (3-D weights, one matrix per head), where transformers
runs `kv_b_proj` on the latent keys instead. An `Observer` (listed in `Architecture.observers`) finds
such weights in a model, computes their inputs from transformers' intermediate values while it runs,
and hands them to the collector per matrix (`MatrixSink.observe_matrices`): `[n_mat, n_cols]` sums
and one token count, as llama-imatrix gathers a plain `MUL_MAT` of a 3-D weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from imatrix.models.patches import Handle


class MatrixSink(Protocol):
    """Where observers put what they measure (`ActivationCollector`)."""

    def observe_matrices(self, name: str, rows: torch.Tensor) -> None:
        """Rows `[n_seq, n_mat, n_tokens, n_cols]`: token rows of each of `name`'s matrices, per sequence."""
        ...


class Observer(Protocol):
    def find(self, model: torch.nn.Module, gguf_names: dict[str, tuple[str, ...]]) -> dict[str, ObservedTarget]:
        """GGUF name -> target, for every weight of `model` this observer measures (`gguf_names`: the
        model's parameter -> GGUF names)."""
        ...

    def attach(self, module: torch.nn.Module, names: dict[str, str], sink: MatrixSink) -> list[Handle]:
        """Start measuring `module` (`names`: role -> GGUF name) into `sink`."""
        ...


@dataclass(frozen=True)
class ObservedTarget:
    """What is measured under one GGUF name: the `role` input of `module`, as `observer` computes it,
    for a weight of `n_mat` matrices with `n_cols` input columns each."""

    module: torch.nn.Module
    role: str
    n_mat: int
    n_cols: int
    observer: Observer

    @property
    def width(self) -> int:
        """Values in the accumulator: llama.cpp keeps a dense 3-D weight's sums as one row, matrix after matrix."""
        return self.n_mat * self.n_cols


def observed_targets(observers: tuple[Observer, ...], model: torch.nn.Module,
                     gguf_names: dict[str, tuple[str, ...]]) -> dict[str, ObservedTarget]:
    targets: dict[str, ObservedTarget] = {}
    for observer in observers:
        targets.update(observer.find(model, gguf_names))
    return targets


def attach_observers(targets: dict[str, ObservedTarget], sink: MatrixSink) -> list[Handle]:
    """Attach each observer once per module, with all of the module's GGUF names."""
    modules: dict[int, tuple[ObservedTarget, dict[str, str]]] = {}
    for name, target in targets.items():
        modules.setdefault(id(target.module), (target, {}))[1][target.role] = name
    handles: list[Handle] = []
    for target, names in modules.values():
        handles.extend(target.observer.attach(target.module, names, sink))
    return handles
