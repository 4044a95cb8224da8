"""How the model is driven over the chunks: windows of batches, saves, perplexity, progress, ranks.

`collect()` is the library entry point behind the `imatrix` command. Which executor runs the model
(whole model in memory, or one layer at a time) is chosen here; what is measured is the
`ActivationCollector`'s business and does not depend on it.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imatrix.collect.chunks import read_calibration_text, tokenize_chunks
from imatrix.collect.distributed import SINGLE, Group
from imatrix.collect.executors import Executor, InMemoryExecutor
from imatrix.collect.hooks import ActivationCollector, dense_width
from imatrix.collect.in_flight import ChunksInFlight, default_chunks_in_flight
from imatrix.collect.moe import ExpertTarget, expert_count_lines
from imatrix.collect.perplexity import PerplexityMeter, projected_partials
from imatrix.collect.resume import RunRecord, check_resumable, model_fingerprint, text_sha256
from imatrix.collect.targets import collection_targets
from imatrix.errors import ImatrixError
from imatrix.formats.atomic import check_output_path, claimed_output
from imatrix.matrix import ImportanceMatrix
from imatrix.models.loader import LoadedModel, load_model
from imatrix.models.open import open_model
from imatrix.models.precision import compute_dtype


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
    # compute dtype (None: the device's fastest faithful one, `models.precision`); statistics accumulate in
    # float32 regardless
    dtype: torch.dtype | None = None
    sequential: bool | None = None  # layer by layer; None: when the weights would not fit in memory
    window_chunks: int = 64  # sequential: chunks pushed through each loaded layer at most
    resume: bool = False  # continue from output_file's chunk_count
    # model in memory on the CPU: chunks run at once, each in its own thread on threads/n intra-op
    # threads; 0: two with two threads or more (see collect.in_flight)
    chunks_in_flight: int = 0

    @property
    def n_seq(self) -> int:
        return max(1, self.n_batch // self.n_ctx)

    @property
    def batch_size(self) -> int:
        """-b as llama-imatrix clamps it: whole chunks (n_seq·n_ctx) from n_ctx up, as given below it."""
        return min(self.n_batch, self.n_seq * self.n_ctx)


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


def collect(model: str | Path | LoadedModel | Executor, text_file: str | Path, options: CollectOptions | None = None,
            base: ImportanceMatrix | None = None, device: str | torch.device = "cpu",
            stdout: Callable[[str], None] | None = None, group: Group = SINGLE) -> CollectResult:
    """Run `model` over `text_file` and return the importance matrix (saved as configured).

    `base` holds statistics loaded from earlier files (`--in-file`); collection continues on top.
    With `options.resume`, an existing `output_file` becomes the base and the chunks it already
    counts are skipped. Under torch.distributed every rank calls this; rank 0 prints and saves.
    """
    options = options or CollectOptions()
    # one run writes the output: a second one is refused, from the start to the last save
    with claimed_output(options.output_file if group.is_main else None):
        return _collect(model, text_file, options, base, device, stdout, group)


def _collect(model: str | Path | LoadedModel | Executor, text_file: str | Path, options: CollectOptions,
             base: ImportanceMatrix | None, device: str | torch.device, stdout: Callable[[str], None] | None,
             group: Group) -> CollectResult:
    if options.n_ctx <= 0 or options.n_batch <= 0:
        raise ImatrixError(f"chunk size {options.n_ctx} and batch size {options.n_batch} must be > 0")
    if options.max_chunks == 0:
        raise ImatrixError("max_chunks=0: no chunk to process")
    emit = stdout or (lambda text: print(text, end="", flush=True))
    if not group.is_main:
        options = dataclasses.replace(options, verbosity=0, progress=False)
        emit = _silent
    if options.output_file is not None and group.is_main:
        check_output_path(options.output_file)
    text = read_calibration_text(text_file)
    dataset = options.dataset_name if options.dataset_name is not None else str(text_file)
    record = RunRecord(text_sha256(text), _model_fingerprint(model), options.from_chunk, options.parse_special,
                       options.process_output)
    base = base.copy() if base is not None else ImportanceMatrix()
    base.chunk_size = options.n_ctx
    skip = 0
    resumed = _resume_from(options, record, dataset, text_file) if options.resume else None
    if resumed is not None:
        skip = _chunks_done(resumed, base, options)
        base = resumed
    else:
        base.datasets = [*base.datasets, dataset]
    base.run_keys = record.metadata()
    executor = open_executor(model, torch.device(device), options)
    targets = collection_targets(executor.loaded, options.process_output)
    _check_fits_model(base, targets, f"{options.output_file}" if resumed is not None else "the --in-file data",
                      executor.loaded.source)
    _warn_context(executor.loaded, options)
    chunks = _tokenize(executor.loaded, text, options, text_file)
    if resumed is not None:
        log(f"compute_imatrix: resuming from {options.output_file} after {skip} chunks", options.verbosity)
    return _run(executor, targets, chunks[skip:], options, base, emit, group, skip)


def _check_fits_model(base: ImportanceMatrix, targets: dict[str, torch.nn.Module | ExpertTarget], what: str,
                      model: object) -> None:
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


def open_executor(model: str | Path | LoadedModel | Executor, device: torch.device,
                  options: CollectOptions) -> Executor:
    """The executor for `model`: in memory, or layer by layer when asked or when it would not fit."""
    if isinstance(model, LoadedModel):
        return InMemoryExecutor(model)
    if hasattr(model, "hidden_states"):
        return model
    from imatrix.collect import sequential

    path = Path(model)
    dtype = compute_dtype(options.dtype, device)
    use_sequential = options.sequential
    if use_sequential is None and path.exists():
        use_sequential = sequential.should_run_sequentially(path, device, dtype)
        if use_sequential:
            log(f"load_model: {path}'s weights would not fit in memory: running layer by layer (--sequential)",
                options.verbosity)
    start = time.perf_counter()
    if use_sequential:
        executor: Executor = sequential.SequentialExecutor(open_model(path, device), device, dtype,
                                                           options.window_chunks)
    else:
        executor = InMemoryExecutor(load_model(path, device=device, dtype=dtype))
    log(f"load_model: loaded {path} in {time.perf_counter() - start:.2f} s", options.verbosity)
    return executor


def _warn_context(loaded: LoadedModel, options: CollectOptions) -> None:
    # llama-imatrix compares its KV cache, n_seq·n_ctx, and so also warns when every chunk fits: what
    # matters is one chunk, the longest sequence the model sees
    trained = getattr(loaded.config, "max_position_embeddings", None)
    if trained and options.n_ctx > trained:
        log(f"compute_imatrix: warning: model was trained on only {trained} context tokens "
            f"({options.n_ctx} per chunk specified)", options.verbosity)


def _silent(text: str) -> None:
    pass


def _tokenize(loaded: LoadedModel, text: str, options: CollectOptions, source: object) -> np.ndarray:
    log("compute_imatrix: tokenizing the input ..", options.verbosity)
    start = time.perf_counter()
    chunks = tokenize_chunks(loaded.tokenizer, text, options.n_ctx, options.from_chunk, options.max_chunks,
                             options.parse_special, source)
    log(f"compute_imatrix: tokenization took {1e3 * (time.perf_counter() - start):g} ms", options.verbosity)
    if options.from_chunk > 0:
        log(f"compute_imatrix: removing initial {options.from_chunk} chunks "
            f"({options.from_chunk * options.n_ctx} tokens)", options.verbosity)
    return chunks


def _model_fingerprint(model: str | Path | LoadedModel | Executor) -> str:
    """`collect.resume.model_fingerprint` of the model's files; "" for a model not loaded from a path."""
    loaded = model if isinstance(model, LoadedModel) else getattr(model, "loaded", None)
    path = Path(loaded.source) if loaded is not None else Path(model)
    return model_fingerprint(path) if path.exists() else ""


def _resume_from(options: CollectOptions, record: RunRecord, dataset: str,
                 text_path: str | Path) -> ImportanceMatrix | None:
    """The output to continue, checked against this run (`collect.resume`); None if there is none yet."""
    output = options.output_file
    if output is None or not Path(output).is_file():
        log(f"compute_imatrix: --resume: no {output} yet, starting from the beginning", options.verbosity)
        return None
    saved = ImportanceMatrix.load(output, chunk_size=options.n_ctx)
    if saved.chunk_size and saved.chunk_size != options.n_ctx:
        raise ImatrixError(f"{output}: cannot resume: it was collected with chunks of {saved.chunk_size} "
                           f"tokens, not {options.n_ctx}")
    check_resumable(saved, record, Path(output), dataset, text_path)
    saved.chunk_size = options.n_ctx
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


# llama.cpp's default -ub: llama-imatrix checks whether to save once per micro-batch of at most this many tokens
LLAMA_CPP_UBATCH = 512


@dataclass(frozen=True)
class SaveEvent:
    """A save llama-imatrix makes: after the micro-batch in which its chunk count (tokens seen / n_ctx)
    reaches a multiple of a frequency, or steps over one (`IMatrixCollector::collect_imatrix`)."""

    chunk_count: int  # llama.cpp's count when it saves: names the snapshot
    chunks_done: int  # chunks of this run that hold those tokens
    batch: int  # the -b batch it saves in: llama.cpp prints a newline per save before that batch's ppl lines
    output: bool  # --output-frequency: the output file
    snapshot: bool  # --save-frequency: <out>.at_<chunk_count>


def llama_cpp_saves(n_chunk: int, n_ctx: int, n_seq: int, n_batch: int, base_tokens: int,
                    output_frequency: int, save_frequency: int) -> list[SaveEvent]:
    """The saves llama-imatrix makes over `n_chunk` chunks, on top of `base_tokens` loaded with
    --in-file, replaying its token count micro-batch by micro-batch (`n_batch` as clamped to n_seq·n_ctx)."""
    tokens, last = base_tokens, base_tokens // n_ctx
    events = []
    for batch, first in enumerate(range(0, n_chunk, n_seq)):
        for micro_batch in _micro_batches(n_seq, min(n_seq, n_chunk - first), n_ctx, n_batch):
            tokens += micro_batch
            count = tokens // n_ctx
            if count == last:
                continue
            step, last = count - last, count
            output = output_frequency > 0 and (count % output_frequency) // step == 0
            snapshot = save_frequency > 0 and (count % save_frequency) // step == 0
            if output or snapshot:
                done = -(-(count * n_ctx - base_tokens) // n_ctx)
                events.append(SaveEvent(count, done, batch, output, snapshot))
    return events


def _micro_batches(n_seq: int, batch_chunks: int, n_ctx: int, n_batch: int) -> Iterator[int]:
    """Tokens in each micro-batch llama.cpp cuts one -b batch of `batch_chunks` chunks into.

    One sequence: decodes of n_batch tokens (several per chunk when -b < -c), each cut flat. Several:
    every sequence has a KV stream of its own, and `split_equal` (llama-batch.cpp) takes the same
    number of tokens from each, as many as fit: 510 tokens for 6 sequences, 504 for 12.
    """
    ubatch = min(LLAMA_CPP_UBATCH, n_batch)
    if n_seq == 1:
        for start in range(0, n_ctx, n_batch):
            decode = min(n_batch, n_ctx - start)
            yield from (min(ubatch, decode - at) for at in range(0, decode, ubatch))
        return
    per_sequence = max(1, ubatch // batch_chunks)
    for start in range(0, n_ctx, per_sequence):
        yield min(per_sequence, n_ctx - start) * batch_chunks


class _Saver:
    """Writes llama.cpp's saves (`llama_cpp_saves`) at the end of the window they fall in.

    A snapshot holds exactly the chunks its name says: the plan cuts the windows there
    (`plan_windows`). The output file is written at the end of the step that reaches its count, with
    every chunk done by then (a -b batch is not cut for it), and says how many it holds.
    """

    def __init__(self, options: CollectOptions, emit: Callable[[str], None], group: Group,
                 events: list[SaveEvent]) -> None:
        self.options, self.emit, self.group = options, emit, group
        self.events = events if options.output_file is not None else []
        self._pending = list(self.events)

    def newlines_before(self, n_seq: int) -> dict[int, int]:
        """Chunk index -> newlines llama.cpp prints before that chunk's ppl line (one per save)."""
        newlines: dict[int, int] = {}
        for event in self.events:
            newlines[event.batch * n_seq] = newlines.get(event.batch * n_seq, 0) + event.output + event.snapshot
        return newlines

    def after_window(self, matrix_at: Callable[[], ImportanceMatrix], chunks_done: int) -> None:
        due = [event for event in self._pending if event.chunks_done <= chunks_done]
        if not due:
            return
        self._pending = self._pending[len(due):]
        matrix = matrix_at()  # a collective under torch.distributed: every rank gets here
        if any(event.output for event in due):
            self.save(matrix, self.options.output_file)
        for event in due:
            if event.snapshot:
                self.save(matrix, Path(f"{self.options.output_file}.at_{event.chunk_count}"))

    def save(self, matrix: ImportanceMatrix, path: Path, newline: bool = False) -> None:
        if not self.group.is_main:
            return
        matrix.save(path, self.options.output_format)
        if newline and self.options.verbosity >= 1:
            self.emit("\n")
        log(f"save_imatrix: stored collected data after {matrix.chunk_count} chunks in {path}",
            self.options.verbosity)


@dataclass(frozen=True)
class _Step:
    """One batch per rank: global batches [first_batch, first_batch + world)."""

    first_batch: int
    batches: list[tuple[int, int]]  # (first chunk, n chunks) per global batch

    @property
    def n_chunks(self) -> int:
        return sum(size for _, size in self.batches)

    @property
    def stop(self) -> int:
        first, size = self.batches[-1]
        return first + size


def plan_windows(n_chunk: int, n_seq: int, group: Group, saves: list[SaveEvent],
                 window_chunks: int) -> list[list[_Step]]:
    """Steps grouped into windows: a window ends where a save falls, or at `window_chunks` chunks.

    -b batches are cut where a snapshot falls, so that it holds exactly its chunks; they stay whole
    otherwise (the result does not depend on how chunks are batched).
    """
    cuts = sorted({event.chunks_done for event in saves if event.snapshot})
    batches = []
    for first in range(0, n_chunk, n_seq):
        stop = min(first + n_seq, n_chunk)
        edges = [first, *(cut for cut in cuts if first < cut < stop), stop]
        batches.extend((start, end - start) for start, end in itertools.pairwise(edges))
    steps: list[_Step] = []
    for index, batch in enumerate(batches):
        if not steps or len(steps[-1].batches) == group.world or steps[-1].stop in cuts:
            steps.append(_Step(index, []))
        steps[-1].batches.append(batch)
    save_points = {event.chunks_done for event in saves}
    windows: list[list[_Step]] = [[]]
    for step in steps:
        windows[-1].append(step)
        start = step.batches[0][0]
        saves_here = any(start < point <= step.stop for point in save_points)
        if saves_here or sum(s.n_chunks for s in windows[-1]) >= window_chunks:
            windows.append([])
    return [window for window in windows if window]


def _run(executor: Executor, targets: dict[str, torch.nn.Module | ExpertTarget], chunks: np.ndarray,
         options: CollectOptions, base: ImportanceMatrix, emit: Callable[[str], None], group: Group,
         first_index: int) -> CollectResult:
    n_chunk, n_ctx, n_seq = chunks.shape[0], options.n_ctx, options.n_seq
    log(f"compute_imatrix: computing over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={options.batch_size}, "
        f"n_seq={n_seq}", options.verbosity)
    meter = PerplexityMeter() if options.compute_ppl and n_chunk else None
    saves = llama_cpp_saves(n_chunk, n_ctx, n_seq, options.batch_size, base.max_count(),
                            options.output_frequency, options.save_frequency)
    saver = _Saver(options, emit, group, saves)
    newlines = saver.newlines_before(n_seq) if options.verbosity >= 1 else {}
    in_flight = chunks_in_flight(executor, options)
    # each chunk in flight needs its place in the window (a window of one step has one chunk at least)
    windows = plan_windows(n_chunk, n_seq, group, saver.events, max(executor.window_chunks, in_flight))
    chunk_ppl: list[float] = []
    progress = tqdm(total=n_chunk * n_ctx, unit="tok", unit_scale=True, file=sys.stderr,
                    disable=not options.progress or options.verbosity < 1, desc="imatrix")
    start = time.perf_counter()
    # the bar is closed on an error or Ctrl-C too, before the error's line, not at interpreter exit
    with progress, ActivationCollector(targets) as collector, torch.inference_mode(), \
            _pool(in_flight, collector) as pool:
        def matrix_now() -> ImportanceMatrix:
            if group.world == 1:
                matrix = collector.snapshot(base)
            else:
                matrix = base.copy()
                matrix.merge_in(group.reduce_matrix(collector.snapshot()))
                matrix.datasets = list(base.datasets)
            matrix.chunk_size = n_ctx
            matrix.update_chunk_count()
            return matrix

        for window in windows:
            scores = _run_window(executor, chunks, window, options, group, pool)
            collector.end_batch()
            scores = dict(pair for rank_scores in group.gather(scores) for pair in rank_scores)
            saver.after_window(matrix_now, window[-1].stop)
            for step in window:
                _report(meter, scores, step, first_index, chunk_ppl, newlines, emit)
                progress.update(step.n_chunks * n_ctx)
        progress.close()
        matrix = matrix_now()
    elapsed = time.perf_counter() - start
    if group.is_main:
        for line in expert_count_lines(matrix):
            log(line, options.verbosity)
    log(f"compute_imatrix: {n_chunk * n_ctx} tokens in {elapsed:.2f} s ({n_chunk * n_ctx / elapsed:.1f} tokens/s)",
        options.verbosity)
    emit("\n")
    if meter is not None:
        emit(meter.final_line() + "\n")
    if options.output_file is not None:
        saver.save(matrix, options.output_file, newline=True)
    emit("\n")
    return CollectResult(matrix, meter, n_chunk, n_chunk * n_ctx / max(elapsed, 1e-9), chunk_ppl)


def chunks_in_flight(executor: Executor, options: CollectOptions) -> int:
    """How many chunks run at once: several only for a model held in memory on the CPU."""
    if not isinstance(executor, InMemoryExecutor) or executor.device.type != "cpu":
        return 1
    return options.chunks_in_flight or default_chunks_in_flight(torch.get_num_threads())


def _pool(in_flight: int, collector: ActivationCollector) -> AbstractContextManager[ChunksInFlight | None]:
    return ChunksInFlight(in_flight, collector, torch.get_num_threads()) if in_flight > 1 else nullcontext()


def _run_window(executor: Executor, chunks: np.ndarray, window: list[_Step], options: CollectOptions,
                group: Group, pool: ChunksInFlight | None) -> list[tuple[int, PerplexityMeter]]:
    """This rank's batches of the window through the model; the perplexity partial of each chunk."""
    mine = [batch for step in window for index, batch in enumerate(step.batches, step.first_batch)
            if group.owns(index)]
    if not mine:
        return []
    if pool is not None:
        return _run_chunks_in_flight(executor, chunks, [first + seq for first, size in mine for seq in range(size)],
                                     options, pool)
    tensors = [torch.from_numpy(chunks[first : first + size]).to(executor.device) for first, size in mine]
    hidden = executor.hidden_states(tensors)
    scores: list[tuple[int, PerplexityMeter]] = []
    if not _projects_output(executor, options):
        return scores  # the output projection is not even loaded
    with executor.output_head() as head:
        for (first, _), batch, states in zip(mine, tensors, hidden, strict=True):
            for seq, partial in enumerate(_score_sequences(head, executor.loaded, states, batch, options)):
                scores.append((first + seq, partial))
    return scores


def _run_chunks_in_flight(executor: InMemoryExecutor, chunks: np.ndarray, indices: list[int],
                          options: CollectOptions, pool: ChunksInFlight) -> list[tuple[int, PerplexityMeter]]:
    """The chunks through the model and scored in their pool slots, a -b batch's chunks shared among
    the slots (up to the executor's `seqs_per_forward` per forward)."""
    project = _projects_output(executor, options)
    per_forward = min(executor.seqs_per_forward, max(1, options.n_seq // pool.n_slots))

    def run_group(group: list[int]) -> list[PerplexityMeter | None]:
        batch = torch.from_numpy(chunks[group]).to(executor.device)
        (states,) = executor.hidden_states([batch])
        if not project:
            return [None] * len(group)
        with executor.output_head() as head:
            scored = list(_score_sequences(head, executor.loaded, states, batch, options))
        return scored or [None] * len(group)

    partials = pool.map(run_group, indices, per_forward)
    return [(chunk, partials[chunk]) for chunk in indices if partials[chunk] is not None]


def _projects_output(executor: Executor, options: CollectOptions) -> bool:
    return options.compute_ppl or _collects_output(executor.loaded, options)


def _score_sequences(head: torch.nn.Module, loaded: LoadedModel, hidden: torch.Tensor, batch: torch.Tensor,
                     options: CollectOptions) -> Iterator[PerplexityMeter]:
    """The perplexity partial of each chunk: positions n_ctx/2 … n_ctx−2 predicting the next token.

    With --process-output on an untied model every position goes through `output.weight` (its hook
    measures them), as llama.cpp requests all logits; otherwise only the scored half is projected,
    a block of the vocabulary at a time, and nothing at all without perplexity.
    """
    first = options.n_ctx // 2
    if not _collects_output(loaded, options):
        if options.compute_ppl:
            yield from projected_partials(head, hidden[:, first:-1], batch[:, first + 1 :], loaded.finish_logits)
        return
    for sequence, tokens in zip(hidden, batch, strict=True):
        logits = loaded.finish_logits(head(sequence)[first:-1])
        if options.compute_ppl:
            partial = PerplexityMeter()
            partial.add(logits, tokens[first + 1 :])
            yield partial


def _collects_output(loaded: LoadedModel, options: CollectOptions) -> bool:
    return options.process_output and not getattr(loaded.config, "tie_word_embeddings", False)


def _report(meter: PerplexityMeter | None, scores: dict[int, PerplexityMeter], step: _Step, first_index: int,
            chunk_ppl: list[float], newlines: dict[int, int], emit: Callable[[str], None]) -> None:
    """Fold the step's chunks into the running estimate in chunk order, printing it as llama.cpp does,
    with the newline it prints on each save before the ppl lines of the -b batch that saved."""
    for first, size in step.batches:
        for chunk in range(first, first + size):
            if chunk in newlines:
                emit("\n" * newlines[chunk])
            if meter is None:
                continue
            meter.add_meter(scores[chunk])
            chunk_ppl.append(meter.ppl)
            emit(f"[{first_index + chunk + 1}]{meter.ppl:.4f},")
