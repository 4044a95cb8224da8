"""KL divergence against a base model's saved log-probabilities, like llama-perplexity's `kl_divergence()`.

The tokens come from the base file; for every scored position we compare the model's softmax
with the base distribution stored there: KL(base ‖ model), whether the top tokens agree, the
change Δp of the probability of the token that actually follows, and both perplexities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.eval.logits_file import KLD_CUTOFF, LogitsFile, dequantize_log_probs
from imatrix.eval.perplexity import Emit, as_loaded, eta_logger, n_seq_for, quiet, scored_logits
from imatrix.models.loader import LoadedModel

CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                "              Δp RMS            Same top p")


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

    def add_chunk(self, logits: torch.Tensor, base_rows: np.ndarray, targets: torch.Tensor) -> None:
        """Accumulate one chunk: the model's `logits [n, vocab]` against the base rows for the same positions."""
        stats = token_stats(logits, base_rows, targets)
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

    def chunk_line(self) -> str:
        ppl_mean, ppl_unc = self.log_ppl()
        ratio, ratio_unc = self.log_ppl_ratio()
        kld, kld_unc = self.kld()
        rms, rms_unc = self.p_diff_rms()
        top, top_unc = self.same_top()
        ppl = math.exp(ppl_mean)
        return (f"{self.n_chunks:4d}    {ppl:9.4f} ± {ppl * ppl_unc:9.4f}    {ratio:10.5f} ± {ratio_unc:10.5f}"
                f"    {kld:10.5f} ± {kld_unc:10.5f}    {100 * rms:6.3f} ± {100 * rms_unc:6.3f} %"
                f"    {100 * top:6.3f} ± {100 * top_unc:6.3f} %")

    def summary(self) -> str:
        """llama.cpp's closing statistics; empty below 100 tokens, where it prints none either."""
        if self.count < 100:
            return ""
        return "\n".join([*self._ppl_block(), "", *self._kld_block(), "", *self._p_diff_block()]) + "\n"

    def _ppl_block(self) -> list[str]:
        (log_ppl, log_unc), (log_base, log_base_unc) = self.log_ppl(), self.log_ppl_base()
        ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
        ppl_unc, ppl_base_unc = ppl * log_unc, ppl_base * log_base_unc
        cov = self.log_ppl_cov()
        ratio, ratio_unc = self.log_ppl_ratio()
        diff_variance = ppl_unc**2 + ppl_base_unc**2 - 2.0 * ppl * ppl_base * cov
        return [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {ppl:10.6f} ± {ppl_unc:10.6f}",
            f"Mean PPL(base)                : {ppl_base:10.6f} ± {ppl_base_unc:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100.0 * _div(cov, log_unc * log_base_unc):6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {ratio:10.6f} ± {ratio_unc:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {math.exp(ratio):10.6f} ± {math.exp(ratio) * ratio_unc:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {ppl - ppl_base:10.6f} ± {math.sqrt(max(diff_variance, 0.0)):10.6f}",
        ]

    def _kld_block(self) -> list[str]:
        values = np.sort(self.kld_values)
        kld, kld_unc = self.kld()
        lines = ["====== KL divergence statistics ======", f"Mean    KLD: {kld:10.6f} ± {kld_unc:10.6f}",
                 f"Maximum KLD: {values[-1]:10.6f}"]
        for label, fraction in (("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9)):
            lines.append(f"{label}   KLD: {percentile(values, fraction):10.6f}")
        lines.append(f"Median  KLD: {median(values):10.6f}")
        for label, fraction in ((("10.0%", 0.1), (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001))):
            lines.append(f"{label}   KLD: {percentile(values, fraction):10.6f}")
        lines.append(f"Minimum KLD: {values[0]:10.6f}")
        return lines

    def _p_diff_block(self) -> list[str]:
        values = np.sort(self.p_diff_values)
        mean, mean_unc = mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, self.count)
        lines = ["====== Token probability statistics ======",
                 f"Mean    Δp: {100 * mean:6.3f} ± {100 * mean_unc:5.3f} %", f"Maximum Δp: {100 * values[-1]:6.3f}%"]
        for label, fraction in (("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9), ("75.0%", 0.75)):
            lines.append(f"{label}   Δp: {100 * percentile(values, fraction):6.3f}%")
        lines.append(f"Median  Δp: {100 * median(values):6.3f}%")
        for label, fraction in (("25.0%", 0.25), ("10.0%", 0.1), (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001)):
            lines.append(f"{label}   Δp: {100 * percentile(values, fraction):6.3f}%")
        rms, rms_unc = self.p_diff_rms()
        top, top_unc = self.same_top()
        lines += [f"Minimum Δp: {100 * values[0]:6.3f}%", f"RMS Δp    : {100 * rms:6.3f} ± {100 * rms_unc:5.3f} %",
                  f"Same top p: {100 * top:6.3f} ± {100 * top_unc:5.3f} %"]
        return lines


def token_stats(logits: torch.Tensor, base_rows: np.ndarray, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position: nll, nll_base, kld, p_diff (float64) and same_top (bool).

    Follows llama.cpp's `log_softmax` overload that reads a uint16 base row: base log-probs at or
    below −16 are left out of the KL sum, and ties for the top token go to the lowest id.
    """
    logits = logits.float()
    n_vocab = logits.shape[1]
    base = dequantize_log_probs(base_rows, n_vocab)
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


def kl_divergence(model: LoadedModel | str | Path, base_file: str | Path, n_batch: int = 2048, max_chunks: int = -1,
                  emit: Emit = quiet, log: Emit = quiet, device: str | torch.device = "cpu") -> KLDResult:
    """KL divergence and PPL of `model` against a base file written by `perplexity(save_base=...)`
    or by `llama-perplexity --kl-divergence-base`.

    `emit` receives the per-chunk table and the closing statistics, `log` the informational lines.
    """
    base = LogitsFile(base_file)
    loaded = as_loaded(model, device)
    n_vocab = int(loaded.config.vocab_size)
    if n_vocab != base.header.n_vocab:
        raise ImatrixError(f"{base_file}: base vocabulary has {base.header.n_vocab} tokens, "
                           f"the model {n_vocab}")
    if max_chunks == 0:
        raise ImatrixError(f"{base_file}: --chunks 0 leaves nothing to score")
    chunks = base.tokens if max_chunks < 0 else base.tokens[:max_chunks]
    outside = np.flatnonzero((chunks < 0) | (chunks >= n_vocab))
    if outside.size:  # llama_decode refuses them too ("invalid token")
        position = int(outside[0])
        raise ImatrixError(f"{base_file}: token id {int(chunks.flat[position])} at position {position} is outside "
                           f"the vocabulary ({n_vocab} tokens)")
    n_chunk, n_ctx = chunks.shape
    n_seq = n_seq_for(n_ctx, n_batch)
    log(f"kl_divergence: computing over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={n_batch}, n_seq={n_seq}")
    result = KLDResult()
    on_batch = eta_logger(n_chunk, n_seq, log, "kl_divergence")
    for index, logits, targets in scored_logits(loaded, chunks, n_batch, on_batch):
        if index == 0:
            emit("\n" + CHUNK_HEADER + "\n")
        result.add_chunk(logits, base.chunk_rows(index), targets)
        emit(result.chunk_line() + "\n")
    emit("\n")
    summary = result.summary()
    if summary:
        emit(summary)
    return result
