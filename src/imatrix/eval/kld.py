"""KL divergence against a base model's saved log-probabilities, like llama-perplexity's `kl_divergence()`.

The tokens come from the base file; for every scored position we compare the model's softmax
with the base distribution stored there (`metrics.log_softmax_kld`): KL(base ‖ model), whether the
top tokens agree, the change Δp of the probability of the token that actually follows, and both
perplexities (`metrics.KLDResult`). The chunks go through the pipeline as perplexity's do; the table
and the closing statistics are printed as llama-perplexity prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.eval.logits_file import LogitsFile
from imatrix.eval.perplexity import EtaLine, evaluated_model, model_input, n_seq_for
from imatrix.metrics import (
    KLDResult,
    log_softmax_kld,
    mean_and_uncertainty,
    median,
    percentile,
    scored_positions,
    scored_targets,
)
from imatrix.models.loader import LoadedModel
from imatrix.options import PerplexityOptions
from imatrix.pipeline import runner
from imatrix.pipeline.distributed import Group
from imatrix.pipeline.windows import Window
from imatrix.reporter import Reporter

CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                "              Δp RMS            Same top p")


def kl_divergence(options: PerplexityOptions, device: torch.device, group: Group, reporter: Reporter) -> KLDResult:
    """KL divergence and PPL of `options.model` against the base file `options.kl_divergence_base`, written by
    `imatrix perplexity --kl-divergence-base` or by `llama-perplexity --kl-divergence-base`."""
    base_file = options.kl_divergence_base
    base = LogitsFile(base_file)
    with evaluated_model(options, device, reporter) as executor:
        loaded = executor.loaded
        chunks = _base_chunks(base, loaded, options.chunks)
        n_chunk, n_ctx = chunks.shape
        n_seq = n_seq_for(n_ctx, options.batch_size)
        reporter.info(f"kl_divergence: computing over {n_chunk} chunks, n_ctx={n_ctx}, "
                      f"batch_size={options.batch_size}, n_seq={n_seq}")
        consumer = _KLDivergence(loaded, base, n_ctx, EtaLine("kl_divergence", n_chunk, reporter), reporter)
        runner.run(executor, model_input(chunks, loaded), consumer, n_seq, group, reporter, options.chunks_in_flight,
                   label=None)
    reporter.result("\n")
    summary = kld_summary(consumer.result)
    if summary:
        reporter.result(summary)
    return consumer.result


def _base_chunks(base: LogitsFile, loaded: LoadedModel, max_chunks: int) -> np.ndarray:
    """The base file's tokens, as many chunks as asked, checked against the model's vocabulary."""
    n_vocab = int(loaded.config.vocab_size)
    if n_vocab != base.header.n_vocab:
        raise ImatrixError(f"{base.path}: base vocabulary has {base.header.n_vocab} tokens, the model {n_vocab}")
    if max_chunks == 0:
        raise ImatrixError(f"{base.path}: --chunks 0 leaves nothing to score")
    chunks = base.tokens if max_chunks < 0 else base.tokens[:max_chunks]
    outside = np.flatnonzero((chunks < 0) | (chunks >= n_vocab))
    if outside.size:  # llama_decode refuses them too ("invalid token")
        position = int(outside[0])
        raise ImatrixError(f"{base.path}: token id {int(chunks.flat[position])} at position {position} is outside "
                           f"the vocabulary ({n_vocab} tokens)")
    return chunks


class _KLDivergence(runner.Unhooked):
    """The pipeline's consumer: each chunk's per-token values against the base rows, folded and printed as a
    table row in chunk order."""

    projects_output = True

    def __init__(self, loaded: LoadedModel, base: LogitsFile, n_ctx: int, eta: EtaLine, reporter: Reporter) -> None:
        self.finish, self.base, self.eta, self.reporter = loaded.finish_logits, base, eta, reporter
        self.positions, self.targets = scored_positions(n_ctx), scored_targets(n_ctx)
        self.result = KLDResult()

    def score(self, chunks: Sequence[int], head: torch.nn.Module, hidden: torch.Tensor,
              tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        scored = []
        for chunk, sequence, ids in zip(chunks, hidden, tokens, strict=True):
            logits = self.finish(head(sequence[self.positions]).float()).cpu()
            scored.append(log_softmax_kld(logits, self.base.chunk_rows(chunk), ids[self.targets].cpu()))
        return scored

    def end_window(self, window: Window, results: dict[int, dict[str, torch.Tensor]], seconds: float) -> None:
        self.eta.after(window, seconds)
        for step in window:
            for chunk in step.chunks():
                if chunk == 0:
                    self.reporter.result("\n" + CHUNK_HEADER + "\n")
                self.result.add(results[chunk])
                self.reporter.result(kld_chunk_line(self.result) + "\n")


def kld_chunk_line(result: KLDResult) -> str:
    """The table row llama-perplexity prints after each chunk: the running estimates."""
    ppl_mean, ppl_unc = result.log_ppl()
    ratio, ratio_unc = result.log_ppl_ratio()
    kld, kld_unc = result.kld()
    rms, rms_unc = result.p_diff_rms()
    top, top_unc = result.same_top()
    ppl = math.exp(ppl_mean)
    return (f"{result.n_chunks:4d}    {ppl:9.4f} ± {ppl * ppl_unc:9.4f}    {ratio:10.5f} ± {ratio_unc:10.5f}"
            f"    {kld:10.5f} ± {kld_unc:10.5f}    {100 * rms:6.3f} ± {100 * rms_unc:6.3f} %"
            f"    {100 * top:6.3f} ± {100 * top_unc:6.3f} %")


def kld_summary(result: KLDResult) -> str:
    """llama.cpp's closing statistics; empty below 100 tokens, where it prints none either."""
    if result.count < 100:
        return ""
    return "\n".join([*_ppl_block(result), "", *_kld_block(result), "", *_p_diff_block(result)]) + "\n"


def _ppl_block(result: KLDResult) -> list[str]:
    (log_ppl, log_unc), (log_base, log_base_unc) = result.log_ppl(), result.log_ppl_base()
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ppl_unc, ppl_base_unc = ppl * log_unc, ppl_base * log_base_unc
    cov = result.log_ppl_cov()
    ratio, ratio_unc = result.log_ppl_ratio()
    diff_variance = ppl_unc**2 + ppl_base_unc**2 - 2.0 * ppl * ppl_base * cov
    correlation = 100.0 * cov / (log_unc * log_base_unc) if log_unc * log_base_unc else math.nan
    return [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {ppl:10.6f} ± {ppl_unc:10.6f}",
        f"Mean PPL(base)                : {ppl_base:10.6f} ± {ppl_base_unc:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {correlation:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {ratio:10.6f} ± {ratio_unc:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {math.exp(ratio):10.6f} ± {math.exp(ratio) * ratio_unc:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {ppl - ppl_base:10.6f} ± {math.sqrt(max(diff_variance, 0.0)):10.6f}",
    ]


def _kld_block(result: KLDResult) -> list[str]:
    values = np.sort(result.kld_values)
    kld, kld_unc = result.kld()
    lines = ["====== KL divergence statistics ======", f"Mean    KLD: {kld:10.6f} ± {kld_unc:10.6f}",
             f"Maximum KLD: {values[-1]:10.6f}"]
    for label, fraction in (("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9)):
        lines.append(f"{label}   KLD: {percentile(values, fraction):10.6f}")
    lines.append(f"Median  KLD: {median(values):10.6f}")
    for label, fraction in ((("10.0%", 0.1), (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001))):
        lines.append(f"{label}   KLD: {percentile(values, fraction):10.6f}")
    lines.append(f"Minimum KLD: {values[0]:10.6f}")
    return lines


def _p_diff_block(result: KLDResult) -> list[str]:
    values = np.sort(result.p_diff_values)
    mean, mean_unc = mean_and_uncertainty(result.sum_p_diff, result.sum_p_diff2, result.count)
    lines = ["====== Token probability statistics ======",
             f"Mean    Δp: {100 * mean:6.3f} ± {100 * mean_unc:5.3f} %", f"Maximum Δp: {100 * values[-1]:6.3f}%"]
    for label, fraction in (("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9), ("75.0%", 0.75)):
        lines.append(f"{label}   Δp: {100 * percentile(values, fraction):6.3f}%")
    lines.append(f"Median  Δp: {100 * median(values):6.3f}%")
    for label, fraction in (("25.0%", 0.25), ("10.0%", 0.1), (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001)):
        lines.append(f"{label}   Δp: {100 * percentile(values, fraction):6.3f}%")
    rms, rms_unc = result.p_diff_rms()
    top, top_unc = result.same_top()
    lines += [f"Minimum Δp: {100 * values[0]:6.3f}%", f"RMS Δp    : {100 * rms:6.3f} ± {100 * rms_unc:5.3f} %",
              f"Same top p: {100 * top:6.3f} ± {100 * top_unc:5.3f} %"]
    return lines
