"""`imatrix perplexity`: llama-perplexity's perplexity and KL-divergence modes over `imatrix.perplexity`."""

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
from imatrix.models.heap import keep_freed_memory
from imatrix.options import PerplexityOptions


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="imatrix perplexity",
        description="Perplexity of a model on a text, or its KL divergence from a base model's saved "
                    "log-probabilities (drop-in for llama-perplexity's default and --kl-divergence modes).",
    )
    add = parser.add_argument
    add("-m", "--model", help="GGUF model or Hugging Face checkpoint directory (default: bundled SmolLM2-135M)")
    add("-f", "--file", help="text to score (not needed with --kl-divergence: the tokens are in the base file)")
    add("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default: 512)")
    add("--chunks", type=int, default=-1, help="maximum number of chunks (default: all)")
    add("-b", "--batch-size", type=positive_int, default=2048,
        help="tokens per forward pass; n_seq = b / c (default: 2048)")
    add("-t", "--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    add("-tb", "--threads-batch", type=int, default=0,
        help="threads for batches: what llama-perplexity computes with (default: --threads)")
    add("--kl-divergence-base", "--save-all-logits", dest="kl_divergence_base", metavar="FILE",
        help="without --kl-divergence: save the base log-probabilities here; with it: read them from here")
    add("--kl-divergence", action="store_true", help="compute the KL divergence from --kl-divergence-base")
    add("--parse-special", action="store_true", help="parse special tokens in the text")
    add("--round-to-f16", action="store_true",
        help="round every quantized weight to F16 first (a quantized GGUF becomes the F16 model made from it)")
    add("--emulate-llama-cpu", action="store_true",
        help="round each matmul's input as llama.cpp's CPU backend does for the weight's type (Q8_0, Q8_K, "
             "F16), to compare with llama-perplexity like for like (GGUF models)")
    add_device_flags(parser)
    add_executor_flags(parser)
    add_verbosity_flags(parser)
    add_ignored_llama_cpp_flags(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    threads = capped_threads(args.threads_batch or args.threads)
    chunks_in_flight = capped_threads(args.chunks_in_flight, "chunks in flight")
    api.perplexity(options_from(PerplexityOptions, args, chunks_in_flight=chunks_in_flight, threads=threads),
                   console_reporter(args.verbosity))
    return 0
