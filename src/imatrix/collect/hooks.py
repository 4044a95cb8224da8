"""What is measured: Σx² per input column and token rows, for every matmul weight.

`ActivationCollector` is a context manager that attaches forward pre-hooks to the model's
`nn.Linear` modules named in `targets` (GGUF name per module) and removes them on exit. Sums stay
on the model's device; nothing is copied to the host until `snapshot()`.
"""

from __future__ import annotations

from types import TracebackType

import torch

from imatrix.errors import ImatrixError
from imatrix.matrix import ImportanceMatrix


class ActivationCollector:
    def __init__(self, targets: dict[str, torch.nn.Module]) -> None:
        self.targets = targets  # GGUF name -> module whose input is measured
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last_input: torch.Tensor | None = None
        self._last_sum_sq: torch.Tensor | None = None
        self._finite: torch.Tensor | None = None

    def __enter__(self) -> ActivationCollector:
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_pre_hook(self._hook_for(name)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = self._last_sum_sq = None

    def _hook_for(self, name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self.observe(name, args[0])

        return hook

    def observe(self, name: str, activations: torch.Tensor) -> None:
        """Add one matmul input `[..., n_cols]` to `name`'s statistics."""
        rows = activations.reshape(-1, activations.shape[-1])
        sum_sq = self._sum_sq(activations, rows)
        accumulated = self.sums.get(name)
        if accumulated is None:
            self.sums[name] = sum_sq.clone()
            self.counts[name] = rows.shape[0]
        else:
            accumulated.add_(sum_sq)
            self.counts[name] += rows.shape[0]

    def _sum_sq(self, activations: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # q/k/v (and gate/up) read the very same tensor: square it once
        if activations is self._last_input and self._last_sum_sq is not None:
            return self._last_sum_sq
        sum_sq = rows.float().square().sum(dim=0)
        finite = torch.isfinite(sum_sq).all()
        self._finite = finite if self._finite is None else self._finite & finite
        self._last_input, self._last_sum_sq = activations, sum_sq
        return sum_sq

    def end_batch(self) -> None:
        """Drop the per-forward cache and stop on non-finite activations (one host sync per batch)."""
        self._last_input = self._last_sum_sq = None
        if self._finite is not None and not bool(self._finite):
            bad = next(name for name, total in self.sums.items() if not torch.isfinite(total).all())
            raise ImatrixError(f"non-finite activations (NaN or Inf) reaching '{bad}'")
        self._finite = None

    def snapshot(self, base: ImportanceMatrix | None = None) -> ImportanceMatrix:
        """The collected statistics added onto `base` (files loaded with --in-file), on the host."""
        merged = base.copy() if base is not None else ImportanceMatrix()
        for name, total in self.sums.items():
            merged.accumulate(name, total.detach().cpu().numpy().reshape(1, -1), [self.counts[name]])
        return merged
