"""`imatrix quantize`: llama-quantize's arguments; the work is `imatrix.quant.model.quantize_model`."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from imatrix.cli.common import ArgumentParser, capped_threads
from imatrix.errors import ImatrixError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="imatrix quantize",
        description="Quantize a GGUF model like llama-quantize, optionally guided by an importance matrix.",
    )
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (GGUF or legacy .dat)")
    p.add_argument("--strict-imatrix", action="store_true",
                   help="refuse imatrix rows that would quantize a tensor to zeros (default: mend them, with a "
                        "warning; llama-quantize writes the zeros)")
    p.add_argument("--include-weights", action="append", default=[], metavar="T",
                   help="use the imatrix only for tensors whose name contains T (repeatable)")
    p.add_argument("--exclude-weights", action="append", default=[], metavar="T",
                   help="do not use the imatrix for tensors whose name contains T (repeatable)")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="type for output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="type for token_embd.weight")
    p.add_argument("--allow-requantize", action="store_true", help="allow input tensors that are already quantized")
    p.add_argument("--pure", action="store_true", help="no mixture: every tensor gets the file type's type")
    p.add_argument("--leave-output-tensor", action="store_true", help="leave output.weight as it is")
    p.add_argument("input", help="input model (F32/F16/BF16 GGUF)")
    p.add_argument("rest", nargs="+", metavar="[output] type [nthreads]",
                   help="output GGUF (default, as llama-quantize names it: ggml-model-<TYPE>.gguf beside the "
                        "input); file type: Q4_K_M, Q4_0, IQ4_XS, ... or its llama.cpp number (Q3_K_HIFI is our "
                        "own outlier type, which only imatrix, not llama.cpp, loads); parallel workers (default: "
                        "all cores)")
    return p


def positionals(input_path: str, rest: list[str]) -> tuple[Path, str, int | None]:
    """(output, type, nthreads) from llama-quantize's `<input> [<output>] <type> [<nthreads>]`: a type in
    second place means the output is `ggml-model-<TYPE>.gguf` in the input's folder (`main` in
    llama.cpp's tools/quantize/quantize.cpp)."""
    from imatrix.quant.mixes import llama_cpp_type_name, looks_like_file_type

    if looks_like_file_type(rest[0]):
        type_text, output, extra = rest[0], None, rest[1:]
    elif len(rest) < 2:
        raise ImatrixError(f"quantize: missing file type after the output '{rest[0]}'")
    else:
        output, type_text, extra = Path(rest[0]), rest[1], rest[2:]
    if len(extra) > 1:
        raise ImatrixError(f"quantize: unexpected arguments: {' '.join(extra[1:])}")
    try:
        n_threads = int(extra[0]) if extra else None
    except ValueError:
        raise ImatrixError(f"quantize: nthreads must be a number (got '{extra[0]}')") from None
    if output is None:
        output = Path(input_path).parent / f"ggml-model-{llama_cpp_type_name(type_text)}.gguf"
    return output, type_text, n_threads


def _show_warning(message: Warning | str, *_args: object, **_kwargs: object) -> None:
    print(f"imatrix: warning: {message}", file=sys.stderr)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.include_weights and args.exclude_weights:
        raise ImatrixError("quantize: --include-weights and --exclude-weights cannot be used together")
    from imatrix.matrix import ImportanceMatrix
    from imatrix.quant.mixes import parse_file_type, parse_tensor_type
    from imatrix.quant.model import quantize_model

    output, type_text, n_threads = positionals(args.input, args.rest)
    if n_threads:
        n_threads = capped_threads(n_threads, "worker processes")
    ft = parse_file_type(type_text)
    out_type = parse_tensor_type(args.output_tensor_type) if args.output_tensor_type else None
    embd_type = parse_tensor_type(args.token_embedding_type) if args.token_embedding_type else None
    started = time.perf_counter()
    imatrix = None
    if args.imatrix:
        imatrix = ImportanceMatrix.load(args.imatrix)
        print(f"load_imatrix: loaded {len(imatrix)} importance matrix entries from {args.imatrix} "
              f"computed on {imatrix.chunk_count} chunks")
    threads = f" using {n_threads} threads" if n_threads and n_threads > 0 else ""
    print(f"quantize: quantizing '{args.input}' to '{output}' as {ft.name}{threads}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning  # type: ignore[assignment]
        quantize_model(
            Path(args.input), output, ft.name, imatrix,
            include_weights=args.include_weights, exclude_weights=args.exclude_weights,
            output_tensor_type=out_type, token_embedding_type=embd_type,
            allow_requantize=args.allow_requantize, pure=args.pure,
            leave_output_tensor=args.leave_output_tensor, n_threads=n_threads,
            imatrix_file=args.imatrix, log=print, strict_imatrix=args.strict_imatrix,
        )
    print(f"\nquantize: total time = {(time.perf_counter() - started) * 1000:8.2f} ms")
    return 0
