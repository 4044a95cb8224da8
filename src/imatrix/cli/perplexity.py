"""`imatrix perplexity`: llama-perplexity's perplexity and KL-divergence modes over `imatrix.eval`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from imatrix.cli.common import (
    LLAMA_LOG_INFO,
    ArgumentParser,
    add_device_flags,
    add_ignored_llama_cpp_flags,
    add_verbosity_flags,
    capped_threads,
    chosen_device,
    positive_int,
)
from imatrix.errors import ImatrixError
from imatrix.eval.cpu_matmul import emulate_cpu_matmul_inputs
from imatrix.eval.kld import kl_divergence
from imatrix.eval.perplexity import perplexity, quiet, stderr_log, stdout_emit
from imatrix.formats.atomic import check_not_an_input, check_output_path
from imatrix.models.bundled import smollm2_path
from imatrix.models.heap import keep_freed_memory
from imatrix.models.loader import load_model


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
    add_verbosity_flags(parser)
    add_ignored_llama_cpp_flags(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    keep_freed_memory()
    threads = capped_threads(args.threads_batch or args.threads)
    if threads > 0:
        torch.set_num_threads(threads)
    model_path = args.model or smollm2_path()
    log = stderr_log if args.verbosity >= LLAMA_LOG_INFO else quiet
    loaded = load_model(model_path, device=chosen_device(args), round_to_f16=args.round_to_f16)
    log(f"perplexity: loaded {model_path}")
    if args.emulate_llama_cpu:
        hooks = emulate_cpu_matmul_inputs(loaded)
        log(f"perplexity: llama.cpp CPU matmul inputs emulated on {len(hooks)} matmuls")
    if args.kl_divergence:
        kl_divergence(loaded, args.kl_divergence_base, n_batch=args.batch_size, max_chunks=args.chunks,
                      emit=stdout_emit, log=log)
    else:
        perplexity(loaded, args.file, n_ctx=args.ctx_size, max_chunks=args.chunks,
                   save_base=args.kl_divergence_base, n_batch=args.batch_size, parse_special=args.parse_special,
                   emit=stdout_emit, log=log)
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.ctx_size <= 3:
        raise ImatrixError(f"--ctx-size must be > 3 (got {args.ctx_size})")
    if args.kl_divergence and not args.kl_divergence_base:
        raise ImatrixError("--kl-divergence needs --kl-divergence-base FILE (the base model's log-probabilities)")
    if args.kl_divergence and not Path(args.kl_divergence_base).is_file():
        raise ImatrixError(f"{args.kl_divergence_base}: no such base logits file")
    if not args.kl_divergence and not args.file:
        raise ImatrixError("perplexity needs a text: -f FILE")
    if not args.kl_divergence and not Path(args.file).is_file():
        raise ImatrixError(f"{args.file}: no such text file")
    if args.kl_divergence_base is not None and not args.kl_divergence:
        check_not_an_input(args.kl_divergence_base, model=args.model, text=args.file)
        check_output_path(args.kl_divergence_base)

