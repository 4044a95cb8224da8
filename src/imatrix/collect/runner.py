"""How the model is executed over the chunks: batches of n_seq chunks, saves, perplexity, progress.

`collect()` is the library entry point behind the `imatrix` command.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imatrix.collect.chunks import read_calibration_text, tokenize_chunks
from imatrix.collect.executors import forward_in_memory
from imatrix.collect.hooks import ActivationCollector
from imatrix.collect.perplexity import PerplexityMeter
from imatrix.collect.targets import collection_targets
from imatrix.matrix import ImportanceMatrix
from imatrix.models.loader import LoadedModel, load_model


@dataclass
class CollectOptions:
    n_ctx: int = 512
    n_batch: int = 2048
    from_chunk: int = 0
    max_chunks: int = -1
    compute_ppl: bool = True
    process_output: bool = False
    parse_special: bool = False
    output_file: Path | None = None
    output_format: str | None = None
    output_frequency: int = 10
    save_frequency: int = 0
    verbosity: int = 1
    dataset_name: str | None = None  # recorded in imatrix.datasets; defaults to the text path
    progress: bool = True

    @property
    def n_seq(self) -> int:
        return max(1, self.n_batch // self.n_ctx)


@dataclass
class CollectResult:
    matrix: ImportanceMatrix
    ppl: PerplexityMeter | None
    n_chunks: int
    tokens_per_second: float
    chunk_ppl: list[float] = field(default_factory=list)


def log(message: str, verbosity: int, level: int = 1) -> None:
    if verbosity >= level:
        print(message, file=sys.stderr, flush=True)


def collect(model: str | Path | LoadedModel, text_file: str | Path, options: CollectOptions | None = None,
            base: ImportanceMatrix | None = None, device: str | torch.device = "cpu",
            stdout: Callable[[str], None] | None = None) -> CollectResult:
    """Run `model` over `text_file` and return the importance matrix (saved as configured).

    `base` holds statistics loaded from earlier files (`--in-file`); collection continues on top.
    """
    options = options or CollectOptions()
    emit = stdout or (lambda text: print(text, end="", flush=True))
    text = read_calibration_text(text_file)
    loaded = model if isinstance(model, LoadedModel) else _load(model, device, options.verbosity)
    chunks = _tokenize(loaded, text, options, text_file)
    dataset = options.dataset_name if options.dataset_name is not None else str(text_file)
    base = base.copy() if base is not None else ImportanceMatrix()
    base.chunk_size = options.n_ctx
    base.datasets = [*base.datasets, dataset]
    return _run(loaded, chunks, options, base, emit)


def _load(path: str | Path, device: str | torch.device, verbosity: int) -> LoadedModel:
    start = time.perf_counter()
    loaded = load_model(path, device=device)
    log(f"load_model: loaded {path} in {time.perf_counter() - start:.2f} s", verbosity)
    return loaded


def _tokenize(loaded: LoadedModel, text: str, options: CollectOptions, source: object) -> np.ndarray:
    log("compute_imatrix: tokenizing the input ..", options.verbosity)
    start = time.perf_counter()
    chunks = tokenize_chunks(loaded.tokenizer, text, options.n_ctx, options.from_chunk, options.max_chunks,
                             options.parse_special, source)
    log(f"compute_imatrix: tokenization took {1e3 * (time.perf_counter() - start):g} ms", options.verbosity)
    return chunks


class _Saver:
    """llama.cpp's save schedule: after the batch in which chunk_count crosses a multiple of the frequency."""

    def __init__(self, options: CollectOptions, emit: Callable[[str], None]) -> None:
        self.options, self.emit = options, emit

    def after_batch(self, matrix_at: Callable[[], ImportanceMatrix], last_chunk: int, step: int) -> None:
        options = self.options
        if options.output_file is None:
            return
        due_output = options.output_frequency > 0 and (last_chunk % options.output_frequency) // step == 0
        due_snapshot = options.save_frequency > 0 and (last_chunk % options.save_frequency) // step == 0
        if not (due_output or due_snapshot):
            return
        matrix = matrix_at()
        if due_output:
            self.save(matrix, options.output_file)
        if due_snapshot:
            self.save(matrix, Path(f"{options.output_file}.at_{last_chunk}"))

    def save(self, matrix: ImportanceMatrix, path: Path) -> None:
        matrix.save(path, self.options.output_format)
        if self.options.verbosity >= 1:
            self.emit("\n")
        log(f"save_imatrix: stored collected data after {matrix.chunk_count} chunks in {path}",
            self.options.verbosity)


def _run(loaded: LoadedModel, chunks: np.ndarray, options: CollectOptions, base: ImportanceMatrix,
         emit: Callable[[str], None]) -> CollectResult:
    n_chunk, n_ctx, n_seq = chunks.shape[0], options.n_ctx, options.n_seq
    if options.verbosity >= 1:
        emit(f"compute_imatrix: computing over {n_chunk} chunks, n_ctx={n_ctx}, "
             f"batch_size={options.n_batch}, n_seq={n_seq}\n")
    device = next(loaded.model.parameters()).device
    meter = PerplexityMeter() if options.compute_ppl else None
    saver = _Saver(options, emit)
    targets = collection_targets(loaded, options.process_output)
    chunk_ppl: list[float] = []
    progress = tqdm(total=n_chunk * n_ctx, unit="tok", unit_scale=True, file=sys.stderr,
                    disable=not options.progress or options.verbosity < 1, desc="imatrix")
    start = time.perf_counter()
    with ActivationCollector(targets) as collector, torch.inference_mode():
        def matrix_now() -> ImportanceMatrix:
            matrix = collector.snapshot(base)
            matrix.chunk_size = n_ctx
            matrix.update_chunk_count()
            return matrix

        for first in range(0, n_chunk, n_seq):
            batch = torch.from_numpy(chunks[first : first + n_seq]).to(device)
            logits = forward_in_memory(loaded, batch, options)
            collector.end_batch()
            last_chunk = (base.max_count() + max(collector.counts.values(), default=0)) // n_ctx
            saver.after_batch(matrix_now, last_chunk, batch.shape[0])
            if meter is not None and logits is not None:
                _score(meter, logits, batch, first, chunk_ppl, emit)
            progress.update(batch.numel())
        progress.close()
        matrix = matrix_now()
    elapsed = time.perf_counter() - start
    emit("\n")
    if meter is not None:
        emit(meter.final_line() + "\n")
    if options.output_file is not None:
        saver.save(matrix, options.output_file)
    return CollectResult(matrix, meter, n_chunk, n_chunk * n_ctx / max(elapsed, 1e-9), chunk_ppl)


def _score(meter: PerplexityMeter, logits: torch.Tensor, batch: torch.Tensor, first_chunk: int,
           chunk_ppl: list[float], emit: Callable[[str], None]) -> None:
    first = batch.shape[1] // 2
    for seq in range(batch.shape[0]):
        meter.add(logits[seq], batch[seq, first + 1 :])
        chunk_ppl.append(meter.ppl)
        emit(f"[{first_chunk + seq + 1}]{meter.ppl:.4f},")
