"""Running perplexity over the second half of each chunk, printed like llama-imatrix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PerplexityMeter:
    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """`logits [n, vocab]` predicting `targets [n]`; accumulates Σ-log p and Σ(log p)²."""
        logits = logits.float()
        # logsumexp - logit[target]: no vocab-sized log-softmax copy per position
        nll = (torch.logsumexp(logits, dim=-1) - logits.gather(1, targets.view(-1, 1)).view(-1)).double()
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.count += int(nll.numel())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    def final(self) -> tuple[float, float] | None:
        """(PPL, its standard error) as llama.cpp estimates them; None if the variance is not positive."""
        mean = self.nll / self.count
        variance = self.nll2 / self.count - mean * mean
        if variance <= 0 or self.count < 2:
            return None
        ppl = math.exp(mean)
        return ppl, math.sqrt(variance / (self.count - 1)) * ppl

    def final_line(self) -> str:
        estimate = self.final()
        if estimate is None:
            return "Unexpected negative standard deviation of log(prob)"
        return f"Final estimate: PPL = {estimate[0]:.4f} +/- {estimate[1]:.5f}"
