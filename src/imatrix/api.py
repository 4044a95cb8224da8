"""The public API: one function per `imatrix` sub-command, each taking its options (`imatrix.options`,
fields named after the command's long flags) and a `Reporter` for what it has to say (silent by default).

    collect     llama-imatrix: an importance matrix from a model and a text   (`collection.run`)
    merge       --in-file a --in-file b -o out: imatrix files summed           (`formats`)
    convert     one imatrix file to GGUF or the legacy .dat                   (`formats`)
    quantize    llama-quantize, imatrix-guided                                 (`quant.model`)
    perplexity  llama-perplexity: perplexity, or KL divergence from a base    (`eval.perplexity`, `eval.kld`)

Each resolves what the command line leaves open (the bundled model and text, the device, the process group
under torchrun, the output format), routes `warnings` to the reporter, and calls the module that does the
work. The work's modules are imported when a function is called: `import imatrix` stays light for the
sub-commands that need no torch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imatrix.errors import ImatrixError
from imatrix.formats import load_imatrices, load_imatrix, save_imatrix
from imatrix.formats.atomic import check_not_an_input, check_output_path
from imatrix.matrix import ImportanceMatrix
from imatrix.options import CollectOptions, ConvertOptions, MergeOptions, PerplexityOptions, QuantizeOptions
from imatrix.reporter import OUTPUT, SILENT, WARN, Reporter

if TYPE_CHECKING:
    from imatrix.collection.run import CollectResult
    from imatrix.eval.perplexity import PerplexityResult
    from imatrix.metrics import KLDResult
    from imatrix.pipeline.distributed import Group
    from imatrix.pipeline.tokens_ahead import TokensAhead
    from imatrix.quant.model import QuantizeReport

__all__ = ["collect", "convert", "load", "load_many", "merge", "perplexity", "quantize", "save"]

load = load_imatrix
load_many = load_imatrices
save = save_imatrix


def collect(options: CollectOptions | None = None, reporter: Reporter = SILENT) -> CollectResult:
    """An importance matrix as llama-imatrix collects it from `options.model` over `options.file`, written
    to `options.output_file` (if given) on llama-imatrix's save schedule. Examples: docs/examples/api.py.

    Under torchrun every rank calls it: the chunks are shared out and rank 0 reports and writes.
    """
    options = options or CollectOptions()
    if options.chunks == 0:
        raise ImatrixError("--chunks 0: no chunk to process")
    if options.chunks_in_flight < 0:
        raise ImatrixError(f"--chunks-in-flight must be >= 0 (got {options.chunks_in_flight})")
    model = _quietly_bundled(options.model, "smollm2_path")
    text = _quietly_bundled(options.file, "default_calibration_text")
    with _tokens_ahead(model, text, options.parse_special) as ahead:
        _use_threads(options.threads)
        from imatrix.collection.run import run_collection

        with _process_group(options.device, options.n_gpu_layers, reporter) as (group, device, reporter):
            if options.output_file is not None:
                if group.is_main:  # rank 0 alone writes: a check on every rank would meet its lock
                    check_not_an_input(options.output_file, model=_path_or_none(options.model),
                                       calibration_text=options.file)
                    check_output_path(options.output_file)
                options = dataclasses.replace(options, output_format=_output_format(options, reporter))
            options = dataclasses.replace(options, model=_bundled_model(options.model, reporter),
                                          file=_bundled_text(options.file, reporter))
            return run_collection(options, device, group, reporter, ahead)


def merge(options: MergeOptions, reporter: Reporter = SILENT) -> ImportanceMatrix:
    """The sum of `options.in_file`'s statistics, as `llama-imatrix --in-file a --in-file b` sums them;
    written to `options.output_file` if given."""
    in_files = list(options.in_file)
    if not in_files:
        raise ImatrixError("--in-file names no file")
    with reporter.warnings_reported():
        output_format = None
        if options.output_file is not None:
            check_output_path(options.output_file)
            output_format = _output_format(options, reporter)
        merged = load_imatrices(in_files, chunk_size=options.ctx_size)
        if options.output_file is not None:
            reporter.info(f"combining {len(in_files)} imatrix file(s) into {options.output_file}")
            save_imatrix(merged, options.output_file, output_format, reporter)
        return merged


def convert(options: ConvertOptions, reporter: Reporter = SILENT) -> ImportanceMatrix:
    """One imatrix file written again as GGUF or legacy `.dat` (`options.output_format`), read as `merge`
    reads it (its chunk count recomputed from its counts)."""
    return merge(MergeOptions([options.in_file], options.output_file, options.output_format, options.ctx_size),
                 reporter)


def quantize(input: str | Path, output: str | Path | None, type: str, options: QuantizeOptions | None = None,
             reporter: Reporter = SILENT) -> QuantizeReport:
    """`input` (a GGUF model) quantized to file type `type` (`Q4_K_M`, `IQ4_XS`, `COPY`, ...) as llama-quantize
    does, into `output` (None for a dry run), with llama-quantize's flags as `options`.

    The reporter gets llama-quantize's lines as results (its stdout) and the warnings.
    """
    from imatrix.quant.mixes import llama_cpp_type_name, parse_file_type, parse_tensor_type
    from imatrix.quant.model import quantize_model
    from imatrix.quant.options import parse_override_kv, tensor_type_patterns

    options = options or QuantizeOptions()
    if options.include_weights and options.exclude_weights:
        raise ImatrixError("quantize: --include-weights and --exclude-weights cannot be used together")
    file_type = parse_file_type(type)
    # refused now, before the model is opened
    tensor_type_patterns(options.tensor_type)
    for text in options.override_kv:
        parse_override_kv(text)
    for given in (options.output_tensor_type, options.token_embedding_type):
        if isinstance(given, str):
            parse_tensor_type(given)
    started = time.perf_counter()
    threads = f" using {options.n_threads} threads" if options.n_threads and options.n_threads > 0 else ""
    named = llama_cpp_type_name(type)
    if options.dry_run:
        reporter.log(f"quantize: calculating quantization size for '{input}' as {named}{threads}", OUTPUT)
    else:
        reporter.log(f"quantize: quantizing '{input}' to '{output}' as {named}{threads}", OUTPUT)
    with reporter.warnings_reported(Warning, every_time=True):
        report = quantize_model(Path(input), output, file_type.name, options=options,
                                log=lambda line: reporter.result(line + "\n"))
    reporter.result(f"\nquantize: total time = {(time.perf_counter() - started) * 1000:8.2f} ms\n")
    return report


def perplexity(options: PerplexityOptions, reporter: Reporter = SILENT) -> PerplexityResult | KLDResult:
    """llama-perplexity: the perplexity of `options.model` on `options.file` (saving the base
    log-probabilities to `kl_divergence_base` if given), or with `kl_divergence` its KL divergence from the
    base log-probabilities in `kl_divergence_base`. Layer by layer and under torchrun too, with the numbers
    of a run in memory."""
    from imatrix.eval.kld import kl_divergence
    from imatrix.eval.perplexity import perplexity as text_perplexity

    _check_perplexity(options)
    if options.model is None:
        from imatrix.models.bundled import smollm2_path

        options = dataclasses.replace(options, model=smollm2_path())
    text = None if options.kl_divergence else options.file
    with _tokens_ahead(options.model, text, options.parse_special) as ahead:
        _use_threads(options.threads)
        from imatrix.eval.kld import kl_divergence
        from imatrix.eval.perplexity import perplexity as text_perplexity

        with _process_group(options.device, options.n_gpu_layers, reporter) as (group, device, reporter):
            if options.kl_divergence:
                return kl_divergence(options, device, group, reporter)
            return text_perplexity(options, device, group, reporter, ahead)


@contextmanager
def _tokens_ahead(model: Any, text: str | Path | None, parse_special: bool) -> Iterator[TokensAhead | None]:
    """The text tokenized in a child process while torch and transformers import (`pipeline.tokens_ahead`),
    where the model is a GGUF file; stopped on the way out."""
    from imatrix.pipeline.tokens_ahead import TokensAhead

    ahead = TokensAhead.start(model, text, parse_special) if model is not None and text is not None else None
    if ahead is None:
        yield None
        return
    with ahead:
        yield ahead


def _quietly_bundled(given: Any, function_name: str) -> Any:
    """`given`, or the bundled file `models.bundled.<function_name>` names (None if it is missing: that is
    reported where the file is opened)."""
    if given is not None:
        return given
    from imatrix.models import bundled

    try:
        return getattr(bundled, function_name)()
    except ImatrixError:
        return None


def _use_threads(threads: int) -> None:
    """-t: torch's intra-op threads (imported here, after the child of `_tokens_ahead` has forked)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def _process_group(device_name: str, n_gpu_layers: int | None,
                   reporter: Reporter) -> Iterator[tuple[Group, Any, Reporter]]:
    """The device, the process group torchrun describes (one process without it), and the rank's reporter
    (silent but on rank 0), with `warnings` reported there."""
    from imatrix.pipeline.distributed import joined
    from imatrix.pipeline.executors import resolve_device

    with reporter.warnings_reported(), joined(resolve_device(device_name, n_gpu_layers)) as (group, device):
        rank_reporter = reporter if group.is_main else reporter.silent()
        with rank_reporter.warnings_reported():
            yield group, device, rank_reporter


def _check_perplexity(options: PerplexityOptions) -> None:
    if options.chunks_in_flight < 0:
        raise ImatrixError(f"--chunks-in-flight must be >= 0 (got {options.chunks_in_flight})")
    if options.ctx_size <= 3:
        raise ImatrixError(f"--ctx-size must be > 3 (got {options.ctx_size})")
    base = options.kl_divergence_base
    if options.kl_divergence and not base:
        raise ImatrixError("--kl-divergence needs --kl-divergence-base FILE (the base model's log-probabilities)")
    if options.kl_divergence and not Path(base).is_file():
        raise ImatrixError(f"{base}: no such base logits file")
    if not options.kl_divergence and not options.file:
        raise ImatrixError("perplexity needs a text: -f FILE")
    if not options.kl_divergence and not Path(options.file).is_file():
        raise ImatrixError(f"{options.file}: no such text file")
    if base is not None and not options.kl_divergence:
        check_not_an_input(base, model=_path_or_none(options.model), text=options.file)
        check_output_path(base)


def _output_format(options: CollectOptions | MergeOptions, reporter: Reporter) -> str:
    """GGUF unless asked otherwise; llama.cpp warns when it chose the format itself and the name says another."""
    if options.output_format is not None:
        return options.output_format
    if Path(options.output_file).suffix != ".gguf":
        reporter.log(f"imatrix: warning: saving GGUF to '{options.output_file}' without a .gguf suffix "
                     "(use --output-format dat for the legacy format)", WARN)
    return "gguf"


def _path_or_none(model: object) -> str | Path | None:
    return model if isinstance(model, str | Path) else None


def _bundled_model(model: Any, reporter: Reporter) -> Any:
    if model is not None:
        return model
    from imatrix.models.bundled import smollm2_path

    path = smollm2_path()
    reporter.info(f"no model given: using the bundled {path}")
    return path


def _bundled_text(text: str | Path | None, reporter: Reporter) -> str | Path:
    if text is not None:
        return text
    from imatrix.models.bundled import default_calibration_text

    path = default_calibration_text()
    reporter.info(f"no calibration text given: using the bundled {path}")
    return path
