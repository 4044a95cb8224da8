"""Routed experts of MoE layers: per-expert Σx² and (token, slot) counts, as llama.cpp's
`IMatrixCollector::collect_imatrix` gathers them from `MUL_MAT_ID`.

An expert stack `blk.N.ffn_{gate,up,down}_exps.weight` gets `sums [n_expert, n_cols]` and
`counts [n_expert]`; a token routed to k experts adds one row to each of them. Gate and up read the
same input, so they share one accumulation. Routers and shared experts are ordinary matmuls and go
through the dense path.

One adapter per way transformers lays experts out:

* `FusedExperts`: all experts in 3-D parameters (`gate_up_proj`, `down_proj`) of a module decorated
  with `use_experts_implementation` (every MoE model of transformers 5.x: Qwen2/3-MoE, Mixtral,
  DeepSeek-V3, OLMoE, …).
* `BatchedExperts`: Llama 4's 3-D experts, which run every expert over every token.
* `ExpertLinears`: an `nn.ModuleList` of per-expert MLPs made of `nn.Linear` (`gate_proj`/`up_proj`/
  `down_proj`, or Mixtral's old `w1`/`w3`/`w2`), as older transformers and remote-code models have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gguf
import numpy as np
import torch

from imatrix.matrix import ImportanceMatrix
from imatrix.models.experts import (
    DOWN,
    GATE,
    GATE_UP,
    UP,
    expert_block,
    is_batched_experts,
    is_fused_experts,
    stack_name,
)
from imatrix.models.patches import Handle, override_attribute

Names = tuple[str, ...]  # GGUF names sharing one accumulation (gate and up)


class ExpertSink(Protocol):
    """Where adapters put what they measure (`ActivationCollector`)."""

    def observe_routed(self, names: Names, n_expert: int, tokens: torch.Tensor, routing: torch.Tensor) -> None: ...

    def observe_by_expert(self, names: Names, n_expert: int, rows: torch.Tensor, expert_ids: torch.Tensor) -> None: ...

    def observe_expert(self, names: Names, n_expert: int, expert: int, rows: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class ExpertTarget:
    """What is measured under one expert-stack GGUF name: `kind` (gate/up/down) of `experts`."""

    experts: torch.nn.Module
    kind: str
    n_expert: int
    layout: ExpertLayout


class ExpertLayout(Protocol):
    def find(self, model: torch.nn.Module, tensor_map: gguf.TensorNameMap | None) -> dict[str, ExpertTarget]:
        """GGUF name -> target for every experts module of this layout in `model`."""
        ...

    def attach(self, experts: torch.nn.Module, names: dict[str, str], sink: ExpertSink) -> list[Handle]:
        """Start measuring `experts` (`names`: kind -> GGUF name) into `sink`."""
        ...


def routing_matrix(top_k_index: torch.Tensor, n_expert: int) -> torch.Tensor:
    """`[n_tokens, n_expert]` float: how many of a token's slots went to each expert (0 or 1)."""
    ids = top_k_index.reshape(top_k_index.shape[0], -1).long()
    routing = torch.zeros(ids.shape[0], n_expert, dtype=torch.float32, device=ids.device)
    return routing.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))


class FusedExperts:
    """transformers' 3-D expert parameters; the experts are run by transformers' `grouped_mm`
    implementation so that the rows reaching the down projection come sorted by expert."""

    def find(self, model: torch.nn.Module, tensor_map: gguf.TensorNameMap | None) -> dict[str, ExpertTarget]:
        targets = {}
        for path, module in model.named_modules():
            block = expert_block(path, tensor_map) if is_fused_experts(module) else None
            if block is None:
                continue
            n_expert = module.down_proj.shape[0]
            kinds = (GATE, UP, DOWN) if module.has_gate else (UP, DOWN)
            targets.update({stack_name(block, kind): ExpertTarget(module, kind, n_expert, self) for kind in kinds})
        return targets

    def attach(self, experts: torch.nn.Module, names: dict[str, str], sink: ExpertSink) -> list[Handle]:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        run_experts = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
        n_expert = experts.down_proj.shape[0]
        input_names = tuple(names[kind] for kind in (GATE, UP) if kind in names)
        down_names = (names[DOWN],)
        state = threading.local()  # .ids: this thread's routing (chunks in flight share the module)

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    *args: Any, **kwargs: Any) -> torch.Tensor:
            sink.observe_routed(input_names, n_expert, hidden_states, routing_matrix(top_k_index, n_expert))
            state.ids = top_k_index.reshape(-1).sort().values  # grouped_mm's row order
            return run_experts(experts, hidden_states, top_k_index, top_k_weights, *args, **kwargs)

        def observe_down(activations: torch.Tensor) -> torch.Tensor:
            sink.observe_by_expert(down_names, n_expert, activations, state.ids)
            return activations

        handles: list[Handle] = [override_attribute(experts, "forward", forward)]
        if experts.has_gate:
            apply_gate = type(experts)._apply_gate
            handles.append(override_attribute(experts, "_apply_gate",
                                              lambda out: observe_down(apply_gate(experts, out))))
        else:
            handles.append(experts.act_fn.register_forward_hook(lambda _m, _a, out: observe_down(out)))
        return handles



class BatchedExperts:
    """Llama 4's experts (`models.experts.is_batched_experts`): every expert multiplies its own copy of all
    tokens (`bmm`), scaled by the router's sigmoid score, which is 0 for the experts a token is not routed
    to. llama.cpp multiplies the routed (token, expert) rows only, scaled the same way (`build_moe_ffn`
    weighs llama4's expert input before the FFN), so the rows measured are those that are not all zeros.
    The forward is transformers' own, spelled out to reach the down projection's input."""

    def find(self, model: torch.nn.Module, tensor_map: gguf.TensorNameMap | None) -> dict[str, ExpertTarget]:
        targets = {}
        for path, module in model.named_modules():
            block = expert_block(path, tensor_map) if is_batched_experts(module) else None
            if block is not None:
                n_expert = module.down_proj.shape[0]
                targets.update({stack_name(block, kind): ExpertTarget(module, kind, n_expert, self)
                                for kind in (GATE, UP, DOWN)})
        return targets

    def attach(self, experts: torch.nn.Module, names: dict[str, str], sink: ExpertSink) -> list[Handle]:
        n_expert = experts.down_proj.shape[0]
        input_names = tuple(names[kind] for kind in (GATE, UP) if kind in names)
        down_names = (names[DOWN],)

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            rows = hidden_states.view(n_expert, -1, hidden_states.shape[-1])
            routed = rows.ne(0).any(dim=-1)  # [n_expert, n_tokens]
            expert_ids = torch.arange(n_expert, device=rows.device).unsqueeze(1).expand_as(routed)[routed]
            sink.observe_by_expert(input_names, n_expert, rows[routed], expert_ids)
            gate, up = torch.bmm(rows, experts.gate_up_proj).chunk(2, dim=-1)
            activated = up * experts.act_fn(gate)
            sink.observe_by_expert(down_names, n_expert, activated[routed], expert_ids)
            return torch.bmm(activated, experts.down_proj).view(-1, hidden_states.shape[-1])

        return [override_attribute(experts, "forward", forward)]

_LINEAR_ROLES = {"gate_proj": GATE, "up_proj": UP, "down_proj": DOWN, "w1": GATE, "w3": UP, "w2": DOWN}


class ExpertLinears:
    """`experts = nn.ModuleList(MLP, …)`: each expert's `nn.Linear` sees only the rows routed to it."""

    def find(self, model: torch.nn.Module, tensor_map: gguf.TensorNameMap | None) -> dict[str, ExpertTarget]:
        targets = {}
        for path, module in model.named_modules():
            if not (path.endswith("experts") and isinstance(module, torch.nn.ModuleList) and len(module)):
                continue
            kinds = _linear_kinds(module[0])
            block = expert_block(path, None)
            if block is None or DOWN not in kinds.values():
                continue
            targets.update({stack_name(block, kind): ExpertTarget(module, kind, len(module), self)
                            for kind in kinds.values()})
        return targets

    def attach(self, experts: torch.nn.Module, names: dict[str, str], sink: ExpertSink) -> list[Handle]:
        n_expert = len(experts)
        handles: list[Handle] = []
        for index, expert in enumerate(experts):
            by_kind = {kind: getattr(expert, attribute) for attribute, kind in _linear_kinds(expert).items()}
            input_names = tuple(names[kind] for kind in (GATE, UP) if kind in names)
            first_input = by_kind.get(GATE, by_kind.get(UP))
            for linear, group in ((first_input, input_names), (by_kind[DOWN], (names[DOWN],))):
                handles.append(linear.register_forward_pre_hook(_expert_hook(sink, group, n_expert, index)))
        return handles


def _linear_kinds(expert: torch.nn.Module) -> dict[str, str]:
    return {attribute: kind for attribute, kind in _LINEAR_ROLES.items()
            if isinstance(getattr(expert, attribute, None), torch.nn.Linear)}


def _expert_hook(sink: ExpertSink, names: Names, n_expert: int, index: int) -> Callable:
    def hook(_module: torch.nn.Module, args: tuple) -> None:
        sink.observe_expert(names, n_expert, index, args[0])

    return hook


LAYOUTS: tuple[ExpertLayout, ...] = (FusedExperts(), BatchedExperts(), ExpertLinears())


def expert_targets(model: torch.nn.Module, tensor_map: gguf.TensorNameMap | None = None,
                   fused_gate_up: bool = False) -> dict[str, ExpertTarget]:
    """GGUF name (`blk.N.ffn_up_exps.weight`) -> routed-expert target, over every known layout; with
    `fused_gate_up`, gate and up are the one stack `ffn_gate_up_exps` (`StackJoin.fused_gate_up`)."""
    targets: dict[str, ExpertTarget] = {}
    for layout in LAYOUTS:
        targets.update(layout.find(model, tensor_map))
    if not fused_gate_up:
        return targets
    return {name.replace(GATE, GATE_UP): target for name, target in targets.items() if target.kind != UP}


def attach_experts(targets: dict[str, ExpertTarget], sink: ExpertSink) -> list[Handle]:
    """Hook every experts module named in `targets` once, with all of its GGUF names."""
    modules: dict[int, tuple[ExpertTarget, dict[str, str]]] = {}
    for name, target in targets.items():
        modules.setdefault(id(target.experts), (target, {}))[1][target.kind] = name
    handles: list[Handle] = []
    for target, names in modules.values():
        handles.extend(target.layout.attach(target.experts, names, sink))
    return handles


def expert_token_counts(matrix: ImportanceMatrix) -> dict[str, np.ndarray]:
    """Per-expert (token, slot) counts of each MoE layer, keyed by its down-projection stack."""
    return {name: matrix[name].counts.copy() for name in matrix.names()
            if name.endswith(f".{DOWN}.weight") and matrix[name].n_mat > 1}


def expert_count_lines(matrix: ImportanceMatrix) -> list[str]:
    """One log line per MoE layer: tokens routed to each expert, and how many experts saw none."""
    lines = []
    for name, counts in expert_token_counts(matrix).items():
        idle = int((counts == 0).sum())
        note = f", {idle} of {counts.size} experts without data" if idle else ""
        lines.append(f"expert_counts: {name.rsplit('.', 2)[0]}: {' '.join(map(str, counts.tolist()))}{note}")
    return lines
