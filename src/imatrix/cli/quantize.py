"""`imatrix quantize`: llama-quantize's arguments, parsed into `QuantizeOptions`, over `imatrix.quantize`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from imatrix import api
from imatrix.cli.common import ArgumentParser, capped_threads, console_reporter, options_from
from imatrix.errors import ImatrixError
from imatrix.options import QuantizeOptions


class _TensorTypeFile(argparse.Action):
    """--tensor-type-file: its entries join --tensor-type's at this place on the command line."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from imatrix.quant.options import read_tensor_type_file

        namespace.tensor_type = [*(namespace.tensor_type or []), *read_tensor_type_file(values)]


def _checked(parse_name: str) -> Any:
    """An argparse `type` calling `imatrix.quant.options.<parse_name>` (imported when used)."""

    def parse(text: str) -> Any:
        from imatrix.quant import options

        return getattr(options, parse_name)(text)

    parse.__name__ = parse_name
    return parse


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
    p.add_argument("--tensor-type", action="append", default=[], metavar="NAME=TYPE",
                   help="quantize tensors whose name matches the regular expression NAME (lower-cased) to TYPE, "
                        "ahead of the mix, even with --pure; the first match wins (repeatable)")
    p.add_argument("--tensor-type-file", action=_TensorTypeFile, metavar="FILE", dest="tensor_type",
                   help="NAME=TYPE entries separated by spaces or newlines, as if given by --tensor-type here")
    p.add_argument("--prune-layers", type=_checked("parse_prune_layers"), default=(), metavar="L0,L1,...",
                   help="drop these layers and renumber the rest")
    p.add_argument("--keep-split", action="store_true",
                   help="write one output file per part of the input, named <output>-0000i-of-0000n.gguf")
    p.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="set metadata KEY in the output (TYPE: int, float, bool or str; repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="show each tensor's type and size, the total, and whether an imatrix is needed; write nothing")
    p.add_argument("--max-buffer-size", type=_checked("parse_max_buffer_size"), default=8192, metavar="MiB",
                   help="rows of one tensor held in memory at a time, in MiB (default: 8192)")
    p.add_argument("--allow-requantize", action="store_true", help="allow input tensors that are already quantized")
    p.add_argument("--pure", action="store_true", help="no mixture: every tensor gets the file type's type")
    p.add_argument("--leave-output-tensor", action="store_true", help="leave output.weight as it is")
    p.add_argument("input", help="input model (F32/F16/BF16 GGUF; the first part of a split model)")
    p.add_argument("rest", nargs="+", metavar="[output] type [nthreads]",
                   help="output GGUF (default, as llama-quantize names it: ggml-model-<TYPE>.gguf beside the "
                        "input); file type: Q4_K_M, IQ4_XS, COPY, ... or its llama.cpp number (Q3_K_HIFI is our "
                        "own outlier type, which only imatrix, not llama.cpp, loads); parallel workers (default: "
                        "all cores)")
    return p


def positionals(input_path: str, rest: list[str], keep_split: bool = False,
                dry_run: bool = False) -> tuple[Path | None, str, int | None]:
    """(output, type, nthreads) from llama-quantize's `<input> [<output>] <type> [<nthreads>]`: a type in
    second place means the output is `ggml-model-<TYPE>.gguf` in the input's folder (without `.gguf` under
    --keep-split, none for a dry run), as `main` in llama.cpp's tools/quantize/quantize.cpp names it."""
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
    if output is None and not dry_run:
        suffix = "" if keep_split else ".gguf"
        output = Path(input_path).parent / f"ggml-model-{llama_cpp_type_name(type_text)}{suffix}"
    return output, type_text, n_threads


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    output, type_text, n_threads = positionals(args.input, args.rest, args.keep_split, args.dry_run)
    if n_threads:
        n_threads = capped_threads(n_threads, "worker processes")
    options = options_from(QuantizeOptions, args, tensor_type=tuple(args.tensor_type or ()),
                           override_kv=tuple(args.override_kv), n_threads=n_threads)
    api.quantize(args.input, output, type_text, options, console_reporter())
    return 0
