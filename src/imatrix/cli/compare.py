"""`imatrix compare A.gguf B.gguf [--json]`: similarity of two imatrices per tensor and per layer."""

from __future__ import annotations

import argparse
import sys

from imatrix.cli.common import ArgumentParser, positive_int
from imatrix.formats import load_imatrix
from imatrix.stats.compare import compare_matrices, render_comparison


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="imatrix compare",
        description="Cosine similarity and symmetric KL divergence of normalised importance vectors.",
    )
    parser.add_argument("file_a")
    parser.add_argument("file_b")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("-c", "--ctx-size", type=positive_int, default=512,
                        help="chunk size used to read legacy .dat files")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    a = load_imatrix(args.file_a, chunk_size=args.ctx_size)
    b = load_imatrix(args.file_b, chunk_size=args.ctx_size)
    sys.stdout.write(render_comparison(compare_matrices(a, b, args.file_a, args.file_b), as_json=args.json))
    return 0
