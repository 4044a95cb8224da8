"""`imatrix [flags]`: llama-imatrix's command line over `imatrix.collect`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from imatrix.cli.common import (
    LLAMA_LOG_INFO,
    LLAMA_LOG_WARN,
    ArgumentParser,
    add_device_flags,
    add_ignored_llama_cpp_flags,
    add_verbosity_flags,
    capped_threads,
    chosen_device,
    positive_int,
)
from imatrix.collect import distributed
from imatrix.collect.runner import CollectOptions, collect, log
from imatrix.errors import ImatrixError
from imatrix.formats.atomic import check_not_an_input, check_output_path
from imatrix.matrix import ImportanceMatrix
from imatrix.models.bundled import default_calibration_text, smollm2_path
from imatrix.models.heap import keep_freed_memory
from imatrix.models.precision import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="imatrix", allow_abbrev=False,
        description="Compute an importance matrix (drop-in for llama-imatrix). Subcommands: "
                    "quantize, perplexity, report, compare (imatrix SUBCOMMAND -h).",
    )
    add = parser.add_argument
    add("-m", "--model", help="GGUF model or Hugging Face checkpoint directory (default: bundled SmolLM2-135M)")
    add("-f", "--file", help="calibration text (default with no --in-file: the bundled calibration.txt)")
    add("-o", "--output", "--output-file", dest="output_file", default="imatrix.gguf",
        help="output file (default: imatrix.gguf)")
    add("-c", "--ctx-size", type=positive_int, default=512, help="tokens per chunk (default: 512)")
    add("-b", "--batch-size", type=positive_int, default=2048,
        help="tokens per batch: n_seq = b / c chunks, b is clamped to n_seq·c as llama-imatrix does (default: 2048)")
    add("-t", "--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    add("-tb", "--threads-batch", type=int, default=0,
        help="threads for batches: what llama-imatrix computes with (default: --threads)")
    add_device_flags(parser)
    add("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
        help="compute dtype of the model (statistics always accumulate in float32; default auto: bfloat16 where "
             "the CPU or GPU multiplies it natively, else float32)")
    add("--sequential", action=argparse.BooleanOptionalAction, default=None,
        help="run one layer at a time, loading each from the model file (default: only when the "
             "weights would not fit in memory)")
    add("--window-chunks", type=positive_int, default=64,
        help="with --sequential: chunks pushed through each loaded layer at most (default: 64)")
    add("--chunks-in-flight", type=int, default=0,
        help="model in memory on the CPU: chunks computed at once, each in its own thread on "
             "threads/N threads (default: 2 with two threads or more)")
    add("--resume", action="store_true",
        help="continue an interrupted run from its last saved --output-file (the same text by content, "
             "model, -c and --chunk, or it is refused; the perplexity printed covers the chunks computed in "
             "this run)")
    add("--chunk", "--from-chunk", dest="from_chunk", type=int, default=0, help="skip the first N chunks")
    add("--chunks", type=int, default=-1, help="maximum number of chunks (default: all)")
    add("--ppl", action=argparse.BooleanOptionalAction, default=True,
        help="compute perplexity (default); --no-ppl skips it, and with it the output projection")
    add("--process-output", action="store_true", help="also collect output.weight")
    add("-ofreq", "--output-frequency", type=positive_int, default=10, help="save every N chunks (default: 10)")
    add("--save-frequency", type=int, default=0, help="also write <out>.at_<chunk> every N chunks (default: 0)")
    add("--in-file", action="append", default=[], help="imatrix file(s) to load and merge (repeat or comma-separate)")
    add("--output-format", choices=["gguf", "dat"], default=None, help="gguf (default) or the legacy dat")
    add("--parse-special", action="store_true", help="parse special tokens in the text")
    add_verbosity_flags(parser)
    add("--show-statistics", action="store_true",
        help="print statistics of the --in-file imatrix and exit (several files: of their merge)")
    add("--stats-format", choices=["table", "json", "csv"], default="table", help="with --show-statistics")
    add("--stats-mode", choices=["legacy", "preferred"], default="legacy", help="with --show-statistics")
    add_ignored_llama_cpp_flags(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    in_files = [part for value in args.in_file for part in value.split(",") if part]
    if args.in_file and not in_files:
        raise ImatrixError("--in-file names no file")
    _check_numbers(args)
    verbosity = 1 if args.verbosity >= LLAMA_LOG_INFO else 0  # the library's levels: 0 results, 1 progress too
    if args.show_statistics:
        from imatrix.cli.report import show_statistics

        if not in_files:
            raise ImatrixError("--show-statistics needs --in-file")
        return show_statistics(in_files, args.stats_format, args.stats_mode, args.ctx_size)
    check_not_an_input(args.output_file, model=args.model, calibration_text=args.file)
    check_output_path(args.output_file)
    output = Path(args.output_file)
    output_format = args.output_format or "gguf"
    if args.output_format is None:  # llama.cpp warns only when it chose the format itself
        _warn_suffix(output, args.verbosity >= LLAMA_LOG_WARN)
    base = ImportanceMatrix.load_many(in_files, chunk_size=args.ctx_size) if in_files else None
    if args.file is None and in_files:
        log(f"combining {len(in_files)} imatrix file(s) into {output}", verbosity)
        base.save(output, output_format)
        return 0
    keep_freed_memory()
    threads = capped_threads(args.threads_batch or args.threads)
    if threads > 0:
        torch.set_num_threads(threads)
    options = CollectOptions(
        n_ctx=args.ctx_size, n_batch=args.batch_size, from_chunk=args.from_chunk, max_chunks=args.chunks,
        compute_ppl=args.ppl, process_output=args.process_output, parse_special=args.parse_special,
        output_file=output, output_format=output_format, output_frequency=args.output_frequency,
        save_frequency=args.save_frequency, verbosity=verbosity, dtype=DTYPES.get(args.dtype),
        sequential=args.sequential, window_chunks=args.window_chunks, resume=args.resume,
        chunks_in_flight=capped_threads(args.chunks_in_flight, "chunks in flight"),
    )
    model = args.model or _bundled("model", smollm2_path(), verbosity)
    text = args.file or _bundled("calibration text", default_calibration_text(), verbosity)
    group, device = distributed.from_environment(chosen_device(args))
    try:
        collect(model, text, options, base=base, device=device, group=group)
    finally:
        distributed.shutdown(group)
    return 0


def _bundled(what: str, path: Path, verbosity: int) -> Path:
    log(f"no {what} given: using the bundled {path}", verbosity)
    return path


def _check_numbers(args: argparse.Namespace) -> None:
    if args.chunks == 0:
        raise ImatrixError("--chunks 0: no chunk to process")
    if args.chunks_in_flight < 0:
        raise ImatrixError(f"--chunks-in-flight must be >= 0 (got {args.chunks_in_flight})")


def _warn_suffix(output: Path, shown: bool) -> None:
    if output.suffix != ".gguf" and shown:
        print(f"imatrix: warning: saving GGUF to '{output}' without a .gguf suffix "
              "(use --output-format dat for the legacy format)", file=sys.stderr)

