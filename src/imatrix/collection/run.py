"""A collection as llama-imatrix runs it: the text cut into chunks, the model's matmul inputs measured
(`collection.hooks`) and each chunk's perplexity scored (`collection.scoring`) as the chunks go through
the pipeline (`pipeline.runner`), saved on llama-imatrix's schedule (`collection.saves`), continued
from earlier files (--in-file) or from an interrupted run's output (--resume, `collection.resume`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imatrix.collection.hooks import ActivationCollector, Target, dense_width
from imatrix.collection.moe import ExpertTarget, expert_count_lines
from imatrix.collection.resume import RunRecord, check_resumable, model_fingerprint, text_sha256
from imatrix.collection.saves import Saver, llama_cpp_saves, save_points, snapshot_cuts
from imatrix.collection.scoring import ImatrixScorer
from imatrix.collection.targets import collection_targets
from imatrix.errors import ImatrixError
from imatrix.formats import load_imatrices, load_imatrix
from imatrix.formats.atomic import check_output_path, claimed_output
from imatrix.matrix import ImportanceMatrix
from imatrix.metrics import PerplexityMeter
from imatrix.models.loader import LoadedModel
from imatrix.models.precision import compute_dtype
from imatrix.options import CollectOptions
from imatrix.pipeline import runner
from imatrix.pipeline.chunks import read_calibration_text, tokenize_chunks
from imatrix.pipeline.distributed import Group
from imatrix.pipeline.executors import Executor, open_executor
from imatrix.pipeline.tokens_ahead import TokensAhead, ahead_note, with_tokens_ahead
from imatrix.pipeline.windows import Window
from imatrix.reporter import INFO, Reporter


@dataclass
class CollectResult:
    matrix: ImportanceMatrix
    ppl: PerplexityMeter | None
    n_chunks: int
    tokens_per_second: float
    chunk_ppl: list[float] = field(default_factory=list)


def run_collection(options: CollectOptions, device: torch.device, group: Group, reporter: Reporter,
                   ahead: TokensAhead | None = None) -> CollectResult:
    """Run `options.model` over `options.file` and return the importance matrix (saved as configured).

    Collection continues on top of the `in_file` statistics; with `resume`, an existing `output_file`
    becomes the base and the chunks it already counts are skipped. Under torch.distributed every rank calls
    this (`reporter` silent but on rank 0); rank 0 saves. `ahead`: the text being tokenized in another process.
    """
    # one run writes the output: a second one is refused, from the start to the last save
    with claimed_output(options.output_file if group.is_main else None):
        return _collect(options, device, group, reporter, ahead)


def _collect(options: CollectOptions, device: torch.device, group: Group, reporter: Reporter,
             ahead: TokensAhead | None) -> CollectResult:
    if options.ctx_size <= 0 or options.batch_size <= 0:
        raise ImatrixError(f"chunk size {options.ctx_size} and batch size {options.batch_size} must be > 0")
    if options.output_file is not None and group.is_main:
        check_output_path(options.output_file)
    base = load_imatrices(options.in_file, chunk_size=options.ctx_size) if options.in_file else ImportanceMatrix()
    text = read_calibration_text(options.file)
    dataset = options.dataset_name if options.dataset_name is not None else str(options.file)
    record = RunRecord(text_sha256(text), _model_fingerprint(options.model), options.from_chunk,
                       options.parse_special, options.process_output)
    base.chunk_size = options.ctx_size
    skip = 0
    resumed = _resume_from(options, record, dataset, reporter) if options.resume else None
    if resumed is not None:
        skip = _chunks_done(resumed, base, options)
        base = resumed
    else:
        base.datasets = [*base.datasets, dataset]
    base.run_keys = record.metadata()
    executor = open_executor(options.model, device, compute_dtype(options.dtype, device), options.sequential,
                             options.window_chunks, reporter=reporter)
    targets = collection_targets(executor.loaded, options.process_output)
    _check_fits_model(base, targets, f"{options.output_file}" if resumed is not None else "the --in-file data",
                      executor.loaded.source)
    _warn_context(executor.loaded, options, reporter)
    chunks = _tokenize(executor.loaded, text, options, reporter, ahead)
    if resumed is not None:
        reporter.info(f"compute_imatrix: resuming from {options.output_file} after {skip} chunks")
    return _run(executor, targets, chunks[skip:], options, base, reporter, group, skip)


class _Collection:
    """The pipeline's consumer for a collection: the hooks' statistics, each chunk's perplexity printed as
    llama-imatrix prints it, and the saves, each at the end of the window it falls in."""

    def __init__(self, collector: ActivationCollector, scorer: ImatrixScorer, saver: Saver, base: ImportanceMatrix,
                 options: CollectOptions, reporter: Reporter, group: Group, first_index: int, n_chunk: int) -> None:
        self.collector, self.scorer, self.saver, self.base = collector, scorer, saver, base
        self.reporter, self.group, self.first_index, self.n_ctx = reporter, group, first_index, options.ctx_size
        self.meter = PerplexityMeter() if options.ppl and n_chunk else None
        self.chunk_ppl: list[float] = []
        self.newlines = saver.newlines_before(options.n_seq) if reporter.verbosity >= INFO else {}
        self.projects_output = scorer.projects_output

    def attached(self, n_slots: int) -> ActivationCollector:
        self.collector.use_slots(n_slots)
        return self.collector

    def in_slot(self, slot: int) -> AbstractContextManager[None]:
        return self.collector.in_slot(slot)

    def score(self, chunks: Sequence[int], head: torch.nn.Module, hidden: torch.Tensor,
              tokens: torch.Tensor) -> list[PerplexityMeter]:
        return self.scorer.score(head, hidden, tokens)

    def end_window(self, window: Window, results: dict[int, PerplexityMeter], seconds: float) -> None:
        self.collector.end_batch()
        self.saver.after_window(self.matrix_now, window[-1].stop)
        for step in window:
            self._report(step.chunks(), results)

    def _report(self, chunks: range, results: dict[int, PerplexityMeter]) -> None:
        """Fold the chunks into the running estimate in chunk order, printing it as llama.cpp does, with the
        newline it prints on each save before the ppl lines of the -b batch that saved."""
        for chunk in chunks:
            if chunk in self.newlines:
                self.reporter.result("\n" * self.newlines[chunk])
            if self.meter is None:
                continue
            self.meter.add_meter(results[chunk])
            self.chunk_ppl.append(self.meter.ppl)
            self.reporter.result(f"[{self.first_index + chunk + 1}]{self.meter.ppl:.4f},")

    def matrix_now(self) -> ImportanceMatrix:
        """The statistics so far on top of the base (a collective under torch.distributed)."""
        if self.group.world == 1:
            matrix = self.collector.snapshot(self.base)
        else:
            matrix = self.base.copy()
            matrix.merge_in(self.group.reduce_matrix(self.collector.snapshot()))
            matrix.datasets = list(self.base.datasets)
        matrix.chunk_size = self.n_ctx
        matrix.update_chunk_count()
        return matrix


def _run(executor: Executor, targets: dict[str, Target], chunks: np.ndarray, options: CollectOptions,
         base: ImportanceMatrix, reporter: Reporter, group: Group, first_index: int) -> CollectResult:
    n_chunk, n_ctx, n_seq = chunks.shape[0], options.ctx_size, options.n_seq
    reporter.info(f"compute_imatrix: computing over {n_chunk} chunks, n_ctx={n_ctx}, "
                  f"batch_size={options.clamped_batch_size}, n_seq={n_seq}")
    saves = llama_cpp_saves(n_chunk, n_ctx, n_seq, options.clamped_batch_size, base.max_count(),
                            options.output_frequency, options.save_frequency)
    output = Path(options.output_file) if options.output_file is not None else None
    saver = Saver(output, options.output_format or "gguf", reporter, group, saves)
    scorer = ImatrixScorer(executor.loaded, n_ctx, options.ppl, options.process_output)
    collection = _Collection(ActivationCollector(targets), scorer, saver, base, options, reporter, group,
                             first_index, n_chunk)
    start = time.perf_counter()
    runner.run(executor, chunks, collection, n_seq, group, reporter, options.chunks_in_flight,
               cuts=snapshot_cuts(saver.events), ends=save_points(saver.events))
    matrix = collection.matrix_now()
    elapsed = time.perf_counter() - start
    for line in expert_count_lines(matrix):
        reporter.info(line)
    reporter.info(f"compute_imatrix: {n_chunk * n_ctx} tokens in {elapsed:.2f} s "
                  f"({n_chunk * n_ctx / elapsed:.1f} tokens/s)")
    reporter.result("\n")
    if collection.meter is not None:
        reporter.result(collection.meter.final_line() + "\n")
    if output is not None:
        saver.save(matrix, output, newline=True)
    reporter.result("\n")
    return CollectResult(matrix, collection.meter, n_chunk, n_chunk * n_ctx / max(elapsed, 1e-9), collection.chunk_ppl)


def _check_fits_model(base: ImportanceMatrix, targets: dict[str, Target], what: str, model: object) -> None:
    """Statistics loaded before the run must have the model's shapes: found now, not at the first save.

    Tensors the model does not have are kept as they are, as llama.cpp does.
    """
    for name, target in targets.items():
        if name not in base:
            continue
        stats = base[name]
        if isinstance(target, ExpertTarget):
            # a legacy .dat holds an expert stack as one row, which merges (see matrix._add_into)
            fits = stats.n_mat in (1, target.n_expert)
            found, expected = f"{stats.n_mat} experts", f"{target.n_expert} experts"
        else:
            n_cols = dense_width(target)
            fits = stats.n_mat == 1 and stats.n_cols == n_cols
            found, expected = f"{stats.n_mat} × {stats.n_cols} columns", f"1 × {n_cols} columns"
        if not fits:
            raise ImatrixError(f"{what} does not fit the model {model}: '{name}' has {found} there, "
                               f"{expected} in the model")


def _warn_context(loaded: LoadedModel, options: CollectOptions, reporter: Reporter) -> None:
    # llama-imatrix compares its KV cache, n_seq·n_ctx, and so also warns when every chunk fits: what
    # matters is one chunk, the longest sequence the model sees
    trained = getattr(loaded.config, "max_position_embeddings", None)
    if trained and options.ctx_size > trained:
        reporter.info(f"compute_imatrix: warning: model was trained on only {trained} context tokens "
                      f"({options.ctx_size} per chunk specified)")


def _tokenize(loaded: LoadedModel, text: str, options: CollectOptions, reporter: Reporter,
              ahead: TokensAhead | None) -> np.ndarray:
    reporter.info("compute_imatrix: tokenizing the input ..")
    start = time.perf_counter()
    tokenizer = with_tokens_ahead(loaded.tokenizer, ahead)
    chunks = tokenize_chunks(tokenizer, text, options.ctx_size, options.from_chunk, options.chunks,
                             options.parse_special, options.file)
    reporter.info(f"compute_imatrix: tokenization took {1e3 * (time.perf_counter() - start):g} ms"
                  + ahead_note(tokenizer))
    if options.from_chunk > 0:
        reporter.info(f"compute_imatrix: removing initial {options.from_chunk} chunks "
                      f"({options.from_chunk * options.ctx_size} tokens)")
    return chunks


def _model_fingerprint(model: str | Path | LoadedModel | Executor) -> str:
    """`collection.resume.model_fingerprint` of the model's files; "" for a model not loaded from a path."""
    if isinstance(model, str | Path):
        path = Path(model)
    else:
        path = Path(model.source if isinstance(model, LoadedModel) else model.loaded.source)
    return model_fingerprint(path) if path.exists() else ""


def _resume_from(options: CollectOptions, record: RunRecord, dataset: str,
                 reporter: Reporter) -> ImportanceMatrix | None:
    """The output to continue, checked against this run (`collection.resume`); None if there is none yet."""
    output = options.output_file
    if output is None or not Path(output).is_file():
        reporter.info(f"compute_imatrix: --resume: no {output} yet, starting from the beginning")
        return None
    saved = load_imatrix(output, chunk_size=options.ctx_size)
    if saved.chunk_size and saved.chunk_size != options.ctx_size:
        raise ImatrixError(f"{output}: cannot resume: it was collected with chunks of {saved.chunk_size} "
                           f"tokens, not {options.ctx_size}")
    check_resumable(saved, record, Path(output), dataset, options.file)
    saved.chunk_size = options.ctx_size
    saved.update_chunk_count()
    return saved


def _chunks_done(saved: ImportanceMatrix, in_files: ImportanceMatrix, options: CollectOptions) -> int:
    """Chunks of this text already in `saved`: its chunk_count less what the --in-file base brought."""
    in_files.update_chunk_count()
    done = saved.chunk_count - in_files.chunk_count
    if done < 0:
        raise ImatrixError(f"{options.output_file}: cannot resume: it holds fewer chunks ({saved.chunk_count}) "
                           f"than the --in-file data ({in_files.chunk_count})")
    return done
