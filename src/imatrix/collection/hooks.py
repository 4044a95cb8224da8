"""What is measured: Σx² per input column and token rows, for every matmul weight.

`ActivationCollector` is a context manager that attaches forward pre-hooks to the modules named in
`targets` (GGUF name per module: `nn.Linear`s and MoE routers), hooks the routed experts
(`ExpertTarget`s, see `collection.moe`) and attaches the adapter's observers (`ObservedTarget`s, see
`models.observers`), and removes all of it on exit. Sums and expert counts stay on
the model's device; nothing is copied to the host until `snapshot()`.

Several chunks may run through the model at once, in threads (`pipeline.in_flight`): each thread adds
into the accumulators of the slot it entered (`in_slot`), and snapshots add the slots up in slot
order, so the result does not depend on which thread ran first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

import torch

from imatrix.collection.moe import ExpertTarget, Handle, Names, attach_experts
from imatrix.errors import ImatrixError
from imatrix.matrix import ImportanceMatrix
from imatrix.models.observers import ObservedTarget, attach_observers

# on CPU, rows are squared and summed this many values at a time: the squares of a block stay in the
# core's cache, where those of a whole [512, 1536] input went to memory and back (0.7 against 1.3 ms)
SQUARES_BLOCK_VALUES = 1 << 16


def column_sum_sq(rows: torch.Tensor) -> torch.Tensor:
    """Σ x² per column of `rows` [..., n_rows, n_cols], in float32: [..., n_cols].

    `vecdot` over the rows: on CPU it runs ~10× faster than `vector_norm`, whose column reduction
    dominated the hooks' cost. The blocks of rows depend on the row count only, so a sequence's
    sums are the same bits whatever is batched beside it.
    """
    rows = rows.float()
    block_rows = max(1, SQUARES_BLOCK_VALUES // rows.shape[-1])
    if rows.device.type != "cpu" or rows.shape[-2] <= block_rows:
        return torch.linalg.vecdot(rows, rows, dim=-2)
    blocks = rows.split(block_rows, dim=-2)
    total = torch.linalg.vecdot(blocks[0], blocks[0], dim=-2)
    for block in blocks[1:]:
        total.add_(torch.linalg.vecdot(block, block, dim=-2))
    return total


def sequence_sum_sq(activations: torch.Tensor) -> torch.Tensor:
    """Σ x² per column of each sequence of `activations` [n_seq, n_tokens, n_cols] (or [n_tokens,
    n_cols]): [n_seq, n_cols].

    Added into the accumulator one sequence at a time, a chunk's sums are the same bits whether it ran
    alone or beside others in a batch, as long as its activations are (`pipeline.executors`): the
    result does not depend on -b.
    """
    return column_sum_sq(activations.reshape(-1, *activations.shape[-2:]))


@dataclass(frozen=True)
class ReorderedInput:
    """A matmul whose weight's input columns llama.cpp's converter reordered (`ColumnOrder`): `module`'s
    input is measured, its column sums reported in the file's order (`columns[i]`: the input column
    behind the file's column i)."""

    module: torch.nn.Module
    columns: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


Target = torch.nn.Module | ReorderedInput | ExpertTarget | ObservedTarget


def dense_width(target: torch.nn.Module | ReorderedInput | ObservedTarget) -> int:
    """Values in a dense target's accumulator: its weight's input columns (all matrices' for an observed one)."""
    return target.width if isinstance(target, ObservedTarget) else target.weight.shape[-1]


@dataclass
class _Slot:
    """The accumulators one thread adds into."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # dense tensors: token rows (no device sync to read)
    # routed experts, keyed by the GGUF names sharing them: [n_expert, n_cols] sums, [n_expert] counts
    expert_sums: dict[Names, torch.Tensor] = field(default_factory=dict)
    expert_counts: dict[Names, torch.Tensor] = field(default_factory=dict)
    last_input: torch.Tensor | None = None
    last_sum_sq: torch.Tensor | None = None
    finite: torch.Tensor | None = None

    def all_sums(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.sums.items(), *((names[0], total) for names, total in self.expert_sums.items())]

    def expert_accumulators(self, names: Names, n_expert: int, n_cols: int,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if names not in self.expert_sums:
            self.expert_sums[names] = torch.zeros(n_expert, n_cols, dtype=torch.float32, device=device)
            self.expert_counts[names] = torch.zeros(n_expert, dtype=torch.int64, device=device)
        return self.expert_sums[names], self.expert_counts[names]

    def check_finite(self, values: torch.Tensor) -> None:
        """Fold `values`' finiteness into one device flag, read once per batch (`end_batch`)."""
        finite = torch.isfinite(values).all()
        self.finite = finite if self.finite is None else self.finite & finite


class ActivationCollector:
    def __init__(self, targets: dict[str, Target]) -> None:
        self.targets = targets  # GGUF name -> module whose input is measured, or routed experts
        self._slots = [_Slot()]
        self._current = threading.local()  # .slot: the _Slot this thread adds into (default: the first)
        self._handles: list[Handle] = []

    def __enter__(self) -> ActivationCollector:
        experts = {name: target for name, target in self.targets.items() if isinstance(target, ExpertTarget)}
        observed = {name: target for name, target in self.targets.items() if isinstance(target, ObservedTarget)}
        for name, target in self.targets.items():
            if isinstance(target, ReorderedInput):
                self._handles.append(target.module.register_forward_pre_hook(self._hook_for(name, target.columns)))
            elif name not in experts and name not in observed:
                self._handles.append(target.register_forward_pre_hook(self._hook_for(name)))
        self._handles.extend(attach_experts(experts, self))
        self._handles.extend(attach_observers(observed, self))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._forget_last_inputs()

    def use_slots(self, n_slots: int) -> None:
        """Have `n_slots` accumulator sets (call before the threads that use them start)."""
        self._slots.extend(_Slot() for _ in range(n_slots - len(self._slots)))

    @contextmanager
    def in_slot(self, index: int) -> Iterator[None]:
        """This thread adds into slot `index` (see `use_slots`) while inside."""
        self._current.slot = self._slots[index]
        try:
            yield
        finally:
            del self._current.slot

    def _slot(self) -> _Slot:
        return getattr(self._current, "slot", self._slots[0])

    def _hook_for(self, name: str, columns: torch.Tensor | None = None):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self.observe(name, args[0], columns)

        return hook

    def observe(self, name: str, activations: torch.Tensor, columns: torch.Tensor | None = None) -> None:
        """Add one matmul input `[..., n_cols]` to the statistics of `name`, a dense target (its
        columns taken in the order `columns` gives, where the file reordered them)."""
        slot = self._slot()
        sums_by_sequence = self._sum_sq(slot, activations)
        if columns is not None:
            sums_by_sequence = sums_by_sequence.index_select(-1, columns.to(sums_by_sequence.device))
        if not slot.sums:
            self._allocate_sums(slot, activations.device)
        for sequence_sums in sums_by_sequence:
            slot.sums[name].add_(sequence_sums)
        slot.counts[name] += activations.numel() // activations.shape[-1]

    def _allocate_sums(self, slot: _Slot, device: torch.device) -> None:
        """Every dense target's accumulator at once, as views of one zeroed buffer.

        Allocated one by one in the middle of the first forward, these small long-lived tensors split
        the heap's freed activation blocks, and glibc's heap grew by ~4 MB per layer (+0.14 GB for
        SmolLM2, in some runs).
        """
        widths = {name: dense_width(target) for name, target in self.targets.items()
                  if not isinstance(target, ExpertTarget)}
        flat = torch.zeros(sum(widths.values()), dtype=torch.float32, device=device)
        for name, width in widths.items():
            slot.sums[name], flat = flat[:width], flat[width:]
            slot.counts[name] = 0

    def observe_matrices(self, name: str, rows: torch.Tensor) -> None:
        """Add the inputs of `name`, a weight of n_mat matrices (an `ObservedTarget`), as llama-imatrix
        adds a plain `MUL_MAT` of a 3-D weight: Σx² per matrix and column, one count of token rows.

        `rows` is `[n_seq, n_mat, n_tokens, n_cols]`, summed one sequence at a time like `observe`.
        """
        slot = self._slot()
        sums_by_sequence = column_sum_sq(rows.reshape(-1, *rows.shape[-3:]))  # [n_seq, n_mat, n_cols]
        slot.check_finite(sums_by_sequence)
        if not slot.sums:
            self._allocate_sums(slot, rows.device)
        total = slot.sums[name].view(sums_by_sequence.shape[1:])
        for sequence_sums in sums_by_sequence:
            total.add_(sequence_sums)
        slot.counts[name] += sums_by_sequence.shape[0] * rows.shape[-2]

    def _sum_sq(self, slot: _Slot, activations: torch.Tensor) -> torch.Tensor:
        # q/k/v (and gate/up) read the very same tensor: square it once
        if activations is slot.last_input and slot.last_sum_sq is not None:
            return slot.last_sum_sq
        sum_sq = sequence_sum_sq(activations)
        slot.check_finite(sum_sq)
        slot.last_input, slot.last_sum_sq = activations, sum_sq
        return sum_sq

    def observe_routed(self, names: Names, n_expert: int, tokens: torch.Tensor, routing: torch.Tensor) -> None:
        """Add token rows `[n_tokens, n_cols]` to the experts they were routed to (`routing`: [n_tokens, n_expert])."""
        slot = self._slot()
        squares = tokens.reshape(-1, tokens.shape[-1]).float().square()
        sums, counts = slot.expert_accumulators(names, n_expert, squares.shape[1], tokens.device)
        sums.addmm_(routing.t(), squares)
        counts.add_(routing.sum(dim=0).round().long())
        slot.check_finite(sums)

    def observe_by_expert(self, names: Names, n_expert: int, rows: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Add rows `[n_rows, n_cols]`, row i belonging to expert `expert_ids[i]`."""
        slot = self._slot()
        rows = rows.reshape(-1, rows.shape[-1])
        sums, counts = slot.expert_accumulators(names, n_expert, rows.shape[1], rows.device)
        sums.index_add_(0, expert_ids, rows.float().square())
        counts.index_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int64))
        slot.check_finite(sums)

    def observe_expert(self, names: Names, n_expert: int, expert: int, rows: torch.Tensor) -> None:
        """Add rows `[..., n_cols]` that all went through expert `expert`."""
        slot = self._slot()
        rows = rows.reshape(-1, rows.shape[-1])
        sums, counts = slot.expert_accumulators(names, n_expert, rows.shape[1], rows.device)
        sums[expert].add_(column_sum_sq(rows))
        counts[expert] += rows.shape[0]
        slot.check_finite(sums[expert])

    def _forget_last_inputs(self) -> None:
        for slot in self._slots:
            slot.last_input = slot.last_sum_sq = None

    def end_batch(self) -> None:
        """Drop the per-forward caches and stop on non-finite activations (one host sync per slot).

        Called between batches, when no thread is adding.
        """
        self._forget_last_inputs()
        for slot in self._slots:
            if slot.finite is not None and not bool(slot.finite):
                bad = next(name for name, total in slot.all_sums() if not torch.isfinite(total).all())
                raise ImatrixError(f"non-finite activations (NaN or Inf) reaching '{bad}'")
            slot.finite = None

    def snapshot(self, base: ImportanceMatrix | None = None) -> ImportanceMatrix:
        """The collected statistics added onto `base` (files loaded with --in-file), on the host."""
        merged = base.copy() if base is not None else ImportanceMatrix()
        for slot in self._slots:
            for name, total in slot.sums.items():
                if slot.counts[name]:  # accumulate copies: the live accumulator keeps changing
                    merged.accumulate(name, total.detach().cpu().numpy().reshape(1, -1), [slot.counts[name]])
            for names, total in slot.expert_sums.items():
                sums, counts = total.detach().cpu().numpy(), slot.expert_counts[names].cpu().numpy()
                for name in names:
                    merged.accumulate(name, sums, counts)
        return merged
