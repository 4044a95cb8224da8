"""Perplexity over a text, chunked and scored like llama-perplexity's `perplexity()`.

Each chunk of n_ctx tokens runs on its own (its first token replaced by BOS when the vocab adds
one); only the second half is scored: the logits at positions n_ctx/2 … n_ctx−2 predict the
tokens after them. Chunks go through the model n_seq = n_batch / n_ctx at a time, and the output
projection runs one chunk at a time, so memory holds one chunk's logits.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imatrix.collect.chunks import make_chunks, read_calibration_text
from imatrix.collect.perplexity import PerplexityMeter
from imatrix.errors import ImatrixError
from imatrix.eval.logits_file import LogitsWriter, quantize_log_probs
from imatrix.models.loader import LoadedModel, load_model

Emit = Callable[[str], None]


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


def stdout_emit(text: str) -> None:
    print(text, end="", flush=True)


def stderr_log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def quiet(_text: str) -> None:
    pass


def as_loaded(model: LoadedModel | str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, device=device)


def n_seq_for(n_ctx: int, n_batch: int) -> int:
    return max(1, n_batch // n_ctx)


def eval_chunks(loaded: LoadedModel, text_path: str | Path, n_ctx: int, max_chunks: int = -1,
                parse_special: bool = False) -> np.ndarray:
    """`int64 [n_chunk, n_ctx]`: the tokenized text (BOS included if the vocab adds it), cut into chunks.

    The tokens are kept as tokenized: the BOS swap happens per forward pass, as in llama.cpp.
    """
    if max_chunks == 0:
        raise ImatrixError(f"{text_path}: --chunks 0 leaves nothing to score")
    text = read_calibration_text(text_path)
    tokens = loaded.tokenizer.encode(text, parse_special=parse_special)
    return make_chunks(tokens, n_ctx, max_chunks=max_chunks, source=text_path)


def scored_logits(loaded: LoadedModel, chunks: np.ndarray, n_batch: int = 2048,
                  on_batch: Callable[[int, float], None] | None = None,
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (chunk index, logits `float32 [n_scored, vocab]`, targets `int64 [n_scored]`) chunk by chunk.

    `on_batch(first_chunk, seconds)` is called after each forward pass.
    """
    n_chunk, n_ctx = chunks.shape
    n_seq, first = n_seq_for(n_ctx, n_batch), n_ctx // 2
    model = loaded.model
    device = next(model.parameters()).device
    bos = loaded.tokenizer.bos_id if loaded.tokenizer.add_bos else None
    with torch.inference_mode():
        for start in range(0, n_chunk, n_seq):
            batch = torch.from_numpy(chunks[start : start + n_seq].copy())
            if bos is not None:
                batch[:, 0] = bos
            began = time.perf_counter()
            hidden = loaded.decoder(input_ids=batch.to(device), use_cache=False).last_hidden_state
            if on_batch is not None:
                on_batch(start, time.perf_counter() - began)
            for seq in range(batch.shape[0]):
                logits = loaded.finish_logits(loaded.lm_head(hidden[seq, first:-1]).float()).cpu()
                yield start + seq, logits, torch.from_numpy(chunks[start + seq, first + 1 :])


def eta_logger(n_chunk: int, n_seq: int, log: Emit, label: str) -> Callable[[int, float], None]:
    """llama.cpp prints the time of the first pass and an estimate for the whole run."""

    def on_batch(start: int, seconds: float) -> None:
        if start == 0:
            minutes = seconds * n_chunk / n_seq / 60
            log(f"{label}: {seconds:.2f} seconds per pass - ETA {minutes:.2f} minutes")

    return on_batch


def perplexity(model: LoadedModel | str | Path, text_path: str | Path, n_ctx: int = 512, max_chunks: int = -1,
               save_base: str | Path | None = None, n_batch: int = 2048, parse_special: bool = False,
               emit: Emit = quiet, log: Emit = quiet, device: str | torch.device = "cpu") -> PerplexityResult:
    """llama-perplexity's PPL of `model` on `text_path`.

    `save_base` also writes the base log-probabilities for a later `kl_divergence` (llama.cpp's
    `--kl-divergence-base` file). `emit` receives the `[i]ppl,` progress and the final line,
    `log` the informational lines.
    """
    loaded = as_loaded(model, device)
    log("perplexity: tokenizing the input ..")
    chunks = eval_chunks(loaded, text_path, n_ctx, max_chunks, parse_special)
    n_chunk, n_seq = chunks.shape[0], n_seq_for(n_ctx, n_batch)
    log(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={n_batch}, "
        f"n_seq={n_seq}")
    meter, chunk_ppl = PerplexityMeter(), []
    logits_iter = scored_logits(loaded, chunks, n_batch, eta_logger(n_chunk, n_seq, log, "perplexity"))
    if save_base is None:
        for index, logits, targets in logits_iter:
            meter.add_nll(_nll(logits, targets))
            _progress(index, meter, chunk_ppl, emit)
    else:
        log(f"perplexity: saving all logits to {save_base}")
        n_vocab = int(loaded.config.vocab_size)
        with LogitsWriter(save_base, n_ctx, n_vocab, chunks) as writer:
            for index, logits, targets in logits_iter:
                rows, nll = quantize_log_probs(logits, targets)
                writer.write_chunk(rows)
                meter.add_nll(nll)
                _progress(index, meter, chunk_ppl, emit)
    result = _result(meter, chunk_ppl, n_ctx)
    emit("\n")
    emit(result.final_line() + "\n")
    return result


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log p(target), float64; llama.cpp sums exp in double, the rest in float."""
    max_logit = logits.max(dim=1, keepdim=True).values
    log_sum_exp = torch.exp(logits - max_logit).double().sum(dim=1).log()
    picked = logits.gather(1, targets.view(-1, 1)).view(-1) - max_logit.view(-1)
    return log_sum_exp - picked.double()


def _progress(index: int, meter: PerplexityMeter, chunk_ppl: list[float], emit: Emit) -> None:
    chunk_ppl.append(meter.ppl)
    emit(f"[{index + 1}]{meter.ppl:.4f},")


def _result(meter: PerplexityMeter, chunk_ppl: list[float], n_ctx: int) -> PerplexityResult:
    estimate = meter.final()
    ppl, error = estimate if estimate is not None else (meter.ppl, None)
    return PerplexityResult(ppl, error, chunk_ppl, n_ctx, meter.count, meter.nll, meter.nll2)
