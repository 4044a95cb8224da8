"""What is computed from logits: the meters and the log-softmax variants, named after the llama.cpp
functions they mirror (tools/perplexity/perplexity.cpp, tools/imatrix/imatrix.cpp).

Three log-softmax variants, each where its tool needs it:

* `log_softmax`: perplexity.cpp's `log_softmax(n_vocab, logits, tok)`, its exponentials summed in
  float64 (`imatrix perplexity`).
* `log_softmax_u16`: its overload that also fills the uint16 row of a `--kl-divergence-base` file.
* `log_softmax_kld`: its overload that reads such a row and scores the KL divergence against it.

llama-imatrix's own perplexity (its `process_logits`) is `projected_nll`: torch's fused float32
log-sum-exp, a block of the vocabulary at a time straight from the hidden states, never holding a
chunk's logits. Emulating the float64 sum there would cost more than the projection's matmul itself,
for differences in the 7th significant digit of the nll.

The meters: `PerplexityMeter` (perplexity.cpp's nll, nll2 and count) and `KLDResult` (its
`kl_divergence_result`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from imatrix.models.storage import linear_rows, output_blocks

# output-projection weights per scoring block: SmolLM2's 49k-token vocabulary in blocks of 1,820 tokens,
# whose float32 weights and logits stay a few MB (larger blocks only grew the heap, not the speed)
SCORE_BLOCK_VALUES = 1 << 20
# a base row keeps 16 nats of range below the top logit (`log_softmax`'s uint16 overload); the KL divergence
# leaves out base log-probabilities at or below −16 (its `base_log_prob` overload)
LOGIT_RANGE = 16.0
KLD_CUTOFF = -16.0

LogitsTransform = Callable[[torch.Tensor], torch.Tensor]


def scored_positions(n_ctx: int) -> slice:
    """The positions whose logits are scored, llama.cpp's `first = n_ctx/2` … n_ctx−2: each predicts the next
    token, so a chunk's second half is scored with at least half a chunk of context."""
    return slice(n_ctx // 2, n_ctx - 1)


def scored_targets(n_ctx: int) -> slice:
    """The tokens those positions predict."""
    return slice(n_ctx // 2 + 1, n_ctx)


# --- meters ---


@dataclass
class PerplexityMeter:
    """Σ−log p, Σ(log p)² and the count of scored positions, as perplexity.cpp's `perplexity()` sums them."""

    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """`logits [n, vocab]` predicting `targets [n]`, through `logsumexp_nll`."""
        self.add_nll(logsumexp_nll(logits, targets))

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


@dataclass
class KLDResult:
    """Sums over every scored token (llama.cpp's `kl_divergence_result`) and the per-token values."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0
    n_chunks: int = 0
    kld_parts: list[np.ndarray] = field(default_factory=list, repr=False)
    p_diff_parts: list[np.ndarray] = field(default_factory=list, repr=False)

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Accumulate one chunk's `log_softmax_kld` values."""
        nll, nll_base = stats["nll"], stats["nll_base"]
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        self.sum_nll_base += float(nll_base.sum())
        self.sum_nll_base2 += float((nll_base * nll_base).sum())
        self.sum_nll_nll_base += float((nll * nll_base).sum())
        kld, p_diff = stats["kld"], stats["p_diff"]
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.sum_p_diff += float(p_diff.sum())
        p_diff2 = p_diff * p_diff
        self.sum_p_diff2 += float(p_diff2.sum())
        self.sum_p_diff4 += float((p_diff2 * p_diff2).sum())
        self.max_p_diff = max(self.max_p_diff, float(p_diff.abs().max()))
        self.n_same_top += int(stats["same_top"].sum())
        self.count += int(nll.numel())
        self.n_chunks += 1
        self.kld_parts.append(kld.float().numpy())
        self.p_diff_parts.append(p_diff.float().numpy())

    @property
    def kld_values(self) -> np.ndarray:
        return np.concatenate(self.kld_parts) if self.kld_parts else np.zeros(0, np.float32)

    @property
    def p_diff_values(self) -> np.ndarray:
        return np.concatenate(self.p_diff_parts) if self.p_diff_parts else np.zeros(0, np.float32)

    def log_ppl(self) -> tuple[float, float]:
        return mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)

    def log_ppl_base(self) -> tuple[float, float]:
        return mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, self.count)

    def log_ppl_cov(self) -> float:
        return covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, self.count)

    @property
    def ppl(self) -> float:
        return math.exp(self.log_ppl()[0])

    @property
    def ppl_base(self) -> float:
        return math.exp(self.log_ppl_base()[0])

    def log_ppl_ratio(self) -> tuple[float, float]:
        """ln(PPL(Q)/PPL(base)) and its uncertainty (correlated errors subtracted)."""
        (mean, unc), (mean_base, unc_base) = self.log_ppl(), self.log_ppl_base()
        variance = unc * unc + unc_base * unc_base - 2.0 * self.log_ppl_cov()
        return mean - mean_base, math.sqrt(max(variance, 0.0))

    def kld(self) -> tuple[float, float]:
        return mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count)

    @property
    def mean_kld(self) -> float:
        return self.kld()[0]

    def p_diff_rms(self) -> tuple[float, float]:
        mse, mse_unc = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, self.count)
        rms = math.sqrt(mse)
        return rms, _div(0.5, rms) * mse_unc if mse_unc else 0.0

    def same_top(self) -> tuple[float, float]:
        """Fraction of positions where both models rank the same token first, and its uncertainty."""
        p = _div(self.n_same_top, self.count)
        return p, math.sqrt(max(_div(p * (1 - p), self.count - 1), 0.0)) if self.count > 1 else 0.0

    @property
    def same_top_percent(self) -> float:
        return 100.0 * self.same_top()[0]


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error, as llama.cpp's `kl_divergence` estimates them (0 for ≤ 10 values)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    variance = total2 / count - mean * mean
    return mean, math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0


def covariance(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (total_ab / count - (total_a / count) * (total_b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between the two nearest sorted values, as llama.cpp does."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    position = float(np.float32(fraction) * np.float32(sorted_values.size - 1))
    low = int(position)
    high = min(low + 1, sorted_values.size - 1)
    weight = position - low
    return float((1 - weight) * sorted_values[low] + weight * sorted_values[high])


def median(sorted_values: np.ndarray) -> float:
    n = sorted_values.size
    return float(sorted_values[n // 2]) if n % 2 else float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


# --- perplexity.cpp's log_softmax overloads ---


def log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) per position of `logits float32 [n, vocab]`, float64: exponentials summed in float64,
    the rest in float32, as perplexity.cpp's `log_softmax(n_vocab, logits, tok)`."""
    max_logit = logits.max(dim=1, keepdim=True).values
    log_sum_exp = torch.exp(logits - max_logit).double().sum(dim=1).log()
    picked = logits.gather(1, targets.view(-1, 1)).view(-1) - max_logit.view(-1)
    return log_sum_exp - picked.double()


def u16_row_width(n_vocab: int) -> int:
    """uint16 values per scored position of a base row: 4 for the two floats, the vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def log_softmax_u16(logits: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """`logits float32 [n, vocab]` → (base rows `uint16 [n, u16_row_width]`, nll `float64 [n]` of `targets`).

    Mirrors perplexity.cpp's `log_softmax` overload that fills a uint16 row, float32 arithmetic included.
    """
    logits = logits.float()
    n, n_vocab = logits.shape
    max_logit = logits.max(dim=1, keepdim=True).values
    min_logit = torch.maximum(logits.min(dim=1, keepdim=True).values, max_logit - LOGIT_RANGE)
    log_sum_exp = torch.exp(logits - max_logit).double().sum(dim=1, keepdim=True).log().float()
    min_log_prob = (min_logit - max_logit) - log_sum_exp
    scale = (max_logit - min_logit) / 65535.0
    inv_scale = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    # round half to even, like llama.cpp's `nearest_int`
    q = torch.round(inv_scale * (logits - min_logit)).clamp_(0, 65535)
    q = torch.where(logits > min_logit, q, torch.zeros_like(q)).to(torch.int32)
    rows = np.zeros((n, u16_row_width(n_vocab)), dtype=np.uint16)
    floats = torch.cat([scale, min_log_prob], dim=1).numpy().astype(np.float32)
    rows[:, :4] = floats.view(np.uint16)
    rows[:, 4 : 4 + n_vocab] = q.numpy().astype(np.uint16)
    picked = logits.gather(1, targets.view(-1, 1).long())
    nll = ((max_logit + log_sum_exp) - picked).view(-1).double()
    return rows, nll


def u16_log_probs(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """Base rows `uint16 [n, u16_row_width]` → log-probabilities `float32 [n, vocab]`."""
    rows = np.ascontiguousarray(rows)
    floats = torch.from_numpy(rows[:, :4].copy().view(np.float32))
    scale, min_log_prob = floats[:, :1], floats[:, 1:2]
    q = torch.from_numpy(rows[:, 4 : 4 + n_vocab].astype(np.float32))
    return scale * q + min_log_prob


def log_softmax_kld(logits: torch.Tensor, base_rows: np.ndarray, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position: nll, nll_base, kld, p_diff (float64) and same_top (bool), as perplexity.cpp's `log_softmax`
    overload that reads a uint16 base row: base log-probs at or below −16 are left out of the KL sum, and
    ties for the top token go to the lowest id."""
    logits = logits.float()
    n_vocab = logits.shape[1]
    base = u16_log_probs(base_rows, n_vocab)
    max_logit = logits.max(dim=1, keepdim=True).values
    log_sum_exp = torch.exp(logits - max_logit).double().sum(dim=1, keepdim=True).log().float()
    log_norm = max_logit + log_sum_exp
    target_index = targets.view(-1, 1).long()
    nll = (log_norm - logits.gather(1, target_index)).view(-1)
    nll_base = -base.gather(1, target_index).view(-1)
    terms = torch.exp(base) * (base - logits + log_norm)
    terms = torch.where(base > KLD_CUTOFF, terms, torch.zeros_like(terms))
    kld = terms.double().sum(dim=1)
    same_top = logits.argmax(dim=1) == base.argmax(dim=1)
    p_diff = torch.exp(-nll) - torch.exp(-nll_base)
    return {"nll": nll.double(), "nll_base": nll_base.double(), "kld": kld, "p_diff": p_diff.double(),
            "same_top": same_top}


# --- llama-imatrix's process_logits, from the hidden states ---


def logsumexp_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) per position of `logits [n, vocab]`, float64, through torch's fused log-sum-exp."""
    return _LogSumExp(logits.shape[0], logits.device).fold(logits.float(), 0, targets).nll()


def projected_nll(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                  finish: LogitsTransform | None = None) -> torch.Tensor:
    """`logsumexp_nll` of final hidden states `[n, d_model]` through the output projection `head` (and
    `finish`, the model's element-wise soft-capping or scaling of logits), a block of vocabulary rows at a
    time, never holding the `[n, vocab]` logits (50 MB per SmolLM2 chunk)."""
    total = _LogSumExp(hidden.shape[0], hidden.device)
    for rows in output_blocks(head, SCORE_BLOCK_VALUES):
        logits = linear_rows(head, hidden, rows).float()
        total.fold(finish(logits) if finish else logits, rows.start, targets)
    return total.nll()


def projected_partials(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                       finish: LogitsTransform | None = None) -> list[PerplexityMeter]:
    """One meter per sequence of `hidden [n_seq, n, d_model]` predicting `targets [n_seq, n]`.

    The sequences go through each block of the vocabulary together: one matmul of 510 rows runs faster than
    two of 255 (two SmolLM2 chunks at -c 512), and with MKL's AVX-512 sgemm gives every row the same bits
    (other kernels may round a row differently in a taller matrix, in the last bits).
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

    Each block's log-sum-exp is torch's fused float32 one; the blocks combine in float64.
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
