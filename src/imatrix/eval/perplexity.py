"""Perplexity over a text, chunked and scored like llama-perplexity's `perplexity()`.

Each chunk of n_ctx tokens runs on its own (its first token replaced by BOS when the vocab adds
one); only the second half is scored: the logits at positions n_ctx/2 … n_ctx−2 predict the
tokens after them (`metrics.log_softmax`). The chunks go through the pipeline (`pipeline.runner`) as a
collection's do, n_seq = n_batch / n_ctx per batch, in memory, layer by layer or on several ranks; the
output projection runs one chunk at a time, so memory holds one chunk's logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imatrix.errors import ImatrixError
from imatrix.eval.cpu_matmul import emulate_cpu_matmul_inputs
from imatrix.eval.logits_file import LogitsWriter
from imatrix.metrics import PerplexityMeter, log_softmax, log_softmax_u16, scored_positions, scored_targets
from imatrix.models.loader import LoadedModel
from imatrix.models.precision import compute_dtype
from imatrix.models.tokenizer import TextTokenizer
from imatrix.options import PerplexityOptions
from imatrix.pipeline import runner
from imatrix.pipeline.chunks import make_chunks, read_calibration_text
from imatrix.pipeline.distributed import Group
from imatrix.pipeline.executors import Executor, open_executor
from imatrix.pipeline.tokens_ahead import TokensAhead, with_tokens_ahead
from imatrix.pipeline.windows import Window
from imatrix.reporter import Reporter


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float | None  # llama.cpp's "+/-"; None where it reports a negative variance
    chunk_ppl: list[float] = field(default_factory=list)  # running PPL after each chunk
    n_ctx: int = 512
    n_tokens: int = 0  # scored tokens
    nll: float = 0.0  # Σ −log p
    nll2: float = 0.0  # Σ (log p)²

    def final_line(self) -> str:
        if self.ppl_error is None:
            return "Unexpected negative standard deviation of log(prob)"
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}"


def n_seq_for(n_ctx: int, n_batch: int) -> int:
    return max(1, n_batch // n_ctx)


@contextlib.contextmanager
def evaluated_model(options: PerplexityOptions, device: torch.device, reporter: Reporter) -> Iterator[Executor]:
    """The executor for `options.model`, with llama.cpp's CPU matmul inputs emulated inside the block if asked."""
    executor = open_executor(options.model, device, compute_dtype(options.dtype, device), options.sequential,
                             options.window_chunks, options.round_to_f16, reporter)
    hooks = emulate_cpu_matmul_inputs(executor.loaded) if options.emulate_llama_cpu else []
    if options.emulate_llama_cpu:
        reporter.info(f"perplexity: llama.cpp CPU matmul inputs emulated on {len(hooks)} matmuls")
    try:
        yield executor
    finally:
        for hook in hooks:
            hook.remove()


def model_input(chunks: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """What the model reads: each chunk's first token replaced by BOS when the vocab adds one (llama.cpp swaps
    it per forward pass; the tokens as tokenized are what a base file stores)."""
    if not loaded.tokenizer.add_bos:
        return chunks
    swapped = chunks.copy()
    swapped[:, 0] = loaded.tokenizer.bos_id
    return swapped


class EtaLine:
    """llama.cpp prints the time of the first pass and an estimate for the whole run."""

    def __init__(self, label: str, n_chunk: int, reporter: Reporter) -> None:
        self.label, self.n_chunk, self.reporter, self.done = label, n_chunk, reporter, False

    def after(self, window: Window, seconds: float) -> None:
        if self.done:
            return
        self.done = True
        window_chunks = sum(step.n_chunks for step in window)
        minutes = seconds * self.n_chunk / window_chunks / 60
        self.reporter.info(f"{self.label}: {seconds / len(window):.2f} seconds per pass - ETA {minutes:.2f} minutes")


def perplexity(options: PerplexityOptions, device: torch.device, group: Group, reporter: Reporter,
               ahead: TokensAhead | None = None) -> PerplexityResult:
    """llama-perplexity's PPL of `options.model` on `options.file`; with `kl_divergence_base`, also the base
    log-probabilities for a later `eval.kld.kl_divergence` (llama.cpp's `--kl-divergence-base` file).
    `ahead`: the text being tokenized in another process."""
    n_ctx, save_base = options.ctx_size, options.kl_divergence_base
    with evaluated_model(options, device, reporter) as executor:
        loaded = executor.loaded
        reporter.info("perplexity: tokenizing the input ..")
        tokenizer = with_tokens_ahead(loaded.tokenizer, ahead)
        chunks = eval_chunks(tokenizer, options.file, n_ctx, options.chunks, options.parse_special)
        n_chunk, n_seq = chunks.shape[0], n_seq_for(n_ctx, options.batch_size)
        reporter.info(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, "
                      f"batch_size={options.batch_size}, n_seq={n_seq}")
        if save_base is not None:
            reporter.info(f"perplexity: saving all logits to {save_base}")
        with _base_writer(save_base if group.is_main else None, n_ctx, loaded, chunks) as writer:
            eta = EtaLine("perplexity", n_chunk, reporter)
            consumer = _Perplexity(loaded, n_ctx, save_base is not None, writer, eta, reporter)
            runner.run(executor, model_input(chunks, loaded), consumer, n_seq, group, reporter,
                       options.chunks_in_flight, label=None)
    result = consumer.result(n_ctx)
    reporter.result("\n")
    reporter.result(result.final_line() + "\n")
    return result


def _base_writer(path: str | Path | None, n_ctx: int, loaded: LoadedModel,
                 chunks: np.ndarray) -> contextlib.AbstractContextManager[LogitsWriter | None]:
    """The base file's writer (the tokens as tokenized), or nothing where none is written."""
    if path is None:
        return contextlib.nullcontext()
    return LogitsWriter(path, n_ctx, int(loaded.config.vocab_size), chunks)


def eval_chunks(tokenizer: TextTokenizer, text_path: str | Path, n_ctx: int, max_chunks: int = -1,
                parse_special: bool = False) -> np.ndarray:
    """`int64 [n_chunk, n_ctx]`: the tokenized text (BOS included if the vocab adds it), cut into chunks."""
    if max_chunks == 0:
        raise ImatrixError(f"{text_path}: --chunks 0 leaves nothing to score")
    text = read_calibration_text(text_path)
    tokens = tokenizer.encode(text, parse_special=parse_special)
    return make_chunks(tokens, n_ctx, max_chunks=max_chunks, source=text_path)


class _Perplexity(runner.Unhooked):
    """The pipeline's consumer: each chunk's −log p (and base rows, when saving them), folded and printed
    `[i]ppl,` in chunk order."""

    projects_output = True

    def __init__(self, loaded: LoadedModel, n_ctx: int, saving: bool, writer: LogitsWriter | None, eta: EtaLine,
                 reporter: Reporter) -> None:
        self.finish, self.saving, self.writer = loaded.finish_logits, saving, writer
        self.eta, self.reporter = eta, reporter
        self.positions, self.targets = scored_positions(n_ctx), scored_targets(n_ctx)
        self.meter, self.chunk_ppl = PerplexityMeter(), []

    def score(self, chunks: Sequence[int], head: torch.nn.Module, hidden: torch.Tensor,
              tokens: torch.Tensor) -> list[Any]:
        """(nll, base rows or None) per sequence."""
        scored = []
        for sequence, ids in zip(hidden, tokens, strict=True):
            logits = self.finish(head(sequence[self.positions]).float()).cpu()
            targets = ids[self.targets].cpu()
            if self.saving:
                rows, nll = log_softmax_u16(logits, targets)
                scored.append((nll, rows))
            else:
                scored.append((log_softmax(logits, targets), None))
        return scored

    def end_window(self, window: Window, results: dict[int, Any], seconds: float) -> None:
        self.eta.after(window, seconds)
        for step in window:
            for chunk in step.chunks():
                nll, rows = results[chunk]
                if self.writer is not None:
                    self.writer.write_chunk(rows)
                self.meter.add_nll(nll)
                self.chunk_ppl.append(self.meter.ppl)
                self.reporter.result(f"[{chunk + 1}]{self.meter.ppl:.4f},")

    def result(self, n_ctx: int) -> PerplexityResult:
        estimate = self.meter.final()
        ppl, error = estimate if estimate is not None else (self.meter.ppl, None)
        return PerplexityResult(ppl, error, self.chunk_ppl, n_ctx, self.meter.count, self.meter.nll, self.meter.nll2)
