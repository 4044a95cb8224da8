"""Running perplexity over the second half of each chunk, printed like llama-imatrix."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from imatrix.models.storage import linear_rows, output_blocks

# output-projection weights per scoring block: SmolLM2's 49k-token vocabulary in blocks of 1,820 tokens,
# whose float32 weights and logits stay a few MB (larger blocks only grew the heap, not the speed)
SCORE_BLOCK_VALUES = 1 << 20


@dataclass
class PerplexityMeter:
    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """`logits [n, vocab]` predicting `targets [n]`; accumulates Σ-log p and Σ(log p)²."""
        self.add_nll(_LogSumExp(logits.shape[0], logits.device).fold(logits.float(), 0, targets).nll())

    def add_nll(self, nll: torch.Tensor) -> None:
        """Add −log p of each scored position."""
        nll = nll.double()
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.count += int(nll.numel())

    def add_meter(self, other: PerplexityMeter) -> None:
        """Add the positions another meter scored (a chunk's partial, folded into the running estimate)."""
        self.nll += other.nll
        self.nll2 += other.nll2
        self.count += other.count

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    def final(self) -> tuple[float, float] | None:
        """(PPL, its standard error) as llama.cpp estimates them; None if the variance is not positive."""
        if self.count < 2:  # -c 1 or 2 scores nothing
            return None
        mean = self.nll / self.count
        variance = self.nll2 / self.count - mean * mean
        if variance <= 0:
            return None
        ppl = math.exp(mean)
        return ppl, math.sqrt(variance / (self.count - 1)) * ppl

    def final_line(self) -> str:
        estimate = self.final()
        if estimate is None:
            return "Unexpected negative standard deviation of log(prob)"
        return f"Final estimate: PPL = {estimate[0]:.4f} +/- {estimate[1]:.5f}"


LogitsTransform = Callable[[torch.Tensor], torch.Tensor]


def projected_nll(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                  finish: LogitsTransform | None = None) -> torch.Tensor:
    """−log p(target) of final hidden states `[n, d_model]` through the output projection `head` (and
    `finish`, the model's element-wise soft-capping or scaling of logits), float64, a block of vocabulary
    rows at a time, never holding the `[n, vocab]` logits (50 MB per SmolLM2 chunk)."""
    total = _LogSumExp(hidden.shape[0], hidden.device)
    for rows in output_blocks(head, SCORE_BLOCK_VALUES):
        logits = linear_rows(head, hidden, rows).float()
        total.fold(finish(logits) if finish else logits, rows.start, targets)
    return total.nll()


def projected_partials(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                       finish: LogitsTransform | None = None) -> list[PerplexityMeter]:
    """One meter per sequence of `hidden [n_seq, n, d_model]` predicting `targets [n_seq, n]`.

    The sequences go through each block of the vocabulary together: one matmul of 510 rows runs ~10%
    faster than two of 255 (two SmolLM2 chunks at -c 512), and with MKL's AVX-512 sgemm gives every row the
    same bits (other kernels may round a row differently in a taller matrix, in the last bits).
    """
    nll = projected_nll(head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), finish)
    meters = []
    for sequence_nll in nll.view(hidden.shape[:2]):
        meter = PerplexityMeter()
        meter.add_nll(sequence_nll)
        meters.append(meter)
    return meters


class _LogSumExp:
    """log Σ exp(logit) and the target's logit per position, folded in over blocks of the vocabulary.

    Each block's log-sum-exp is torch's fused float32 one; the blocks combine in float64. Emulating
    llama.cpp's `log_softmax` (exponentials summed in float64) instead costs more than the
    projection's matmul itself, for differences in the 7th significant digit of the nll.
    """

    def __init__(self, n_positions: int, device: torch.device) -> None:
        self.block_lse: list[torch.Tensor] = []
        self.target_logit = torch.zeros(n_positions, dtype=torch.float32, device=device)

    def fold(self, logits: torch.Tensor, first_id: int, targets: torch.Tensor) -> _LogSumExp:
        """Add `logits [n, block]` of the token ids `first_id …`."""
        self.block_lse.append(torch.logsumexp(logits, dim=1))
        here = (targets >= first_id) & (targets < first_id + logits.shape[1])
        picked = logits.gather(1, (targets - first_id).clamp(0, logits.shape[1] - 1).view(-1, 1)).view(-1)
        self.target_logit = torch.where(here, picked, self.target_logit)
        return self

    def nll(self) -> torch.Tensor:
        """−log p(target) per position, float64."""
        return torch.logsumexp(torch.stack(self.block_lse, dim=1).double(), dim=1) - self.target_logit.double()
