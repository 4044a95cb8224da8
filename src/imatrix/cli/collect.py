"""`imatrix [flags]`: llama-imatrix's command line over `imatrix.collect` (and `merge`, `convert`)."""

from __future__ import annotations

import argparse

from imatrix import api
from imatrix.cli.common import (
    ArgumentParser,
    add_device_flags,
    add_executor_flags,
    add_ignored_llama_cpp_flags,
    add_verbosity_flags,
    capped_threads,
    console_reporter,
    options_from,
    positive_int,
)
from imatrix.errors import ImatrixError
from imatrix.models.heap import keep_freed_memory
from imatrix.options import DTYPE_NAMES, CollectOptions, ConvertOptions, MergeOptions


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
    add("--dtype", choices=["auto", *sorted(DTYPE_NAMES)], default="auto",
        help="compute dtype of the model (statistics always accumulate in float32; default auto: bfloat16 where "
             "the CPU or GPU multiplies it natively, else float32)")
    add_executor_flags(parser)
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
    if args.show_statistics:
        from imatrix.cli.report import show_statistics

        if not in_files:
            raise ImatrixError("--show-statistics needs --in-file")
        return show_statistics(in_files, args.stats_format, args.stats_mode, args.ctx_size)
    reporter = console_reporter(args.verbosity)
    if args.file is None and len(in_files) == 1:
        api.convert(options_from(ConvertOptions, args, in_file=in_files[0]), reporter)
        return 0
    if args.file is None and in_files:
        api.merge(options_from(MergeOptions, args, in_file=in_files), reporter)
        return 0
    keep_freed_memory()
    threads = capped_threads(args.threads_batch or args.threads)
    chunks_in_flight = capped_threads(args.chunks_in_flight, "chunks in flight")
    api.collect(options_from(CollectOptions, args, in_file=in_files, chunks_in_flight=chunks_in_flight,
                             threads=threads), reporter)
    return 0
