"""`imatrix report F.gguf -o report.html|report.png [--png-dir DIR]` and `--show-statistics`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imatrix.cli.common import ArgumentParser, positive_int
from imatrix.errors import ImatrixError
from imatrix.formats import load_imatrices, load_imatrix
from imatrix.formats.atomic import check_output_path
from imatrix.matrix import ImportanceMatrix
from imatrix.stats import compute_statistics, render
from imatrix.stats.report import write_png_dir, write_report


def show_statistics(
    in_files: list[str], stats_format: str = "table", stats_mode: str = "legacy", chunk_size: int = 512
) -> int:
    """Load and merge `in_files`, print their statistics to stdout (llama-imatrix's `--show-statistics`)."""
    if not in_files:
        raise ImatrixError("--show-statistics needs --in-file")
    if stats_format not in ("table", "json", "csv"):
        raise ImatrixError(f"unknown statistics format '{stats_format}' (expected table, json or csv)")
    matrix = load_imatrices(in_files, chunk_size=chunk_size)
    stats = compute_statistics(matrix, stats_mode, ",".join(in_files))
    sys.stdout.write(render(stats, stats_format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="imatrix report", description="Figures and statistics of an imatrix.")
    parser.add_argument("in_files", nargs="+", help="imatrix files (GGUF or legacy .dat); several are merged")
    parser.add_argument("-o", "--output", help="report file: .html (self-contained) or .png")
    parser.add_argument("--png-dir", help="also write each figure as a PNG into this folder")
    parser.add_argument("-c", "--ctx-size", type=positive_int, default=512,
                        help="chunk size used to read legacy .dat files")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.output and not args.png_dir:
        raise ImatrixError("report: give -o report.html|report.png and/or --png-dir DIR")
    if args.output is not None:
        check_output_path(args.output)
    if args.png_dir is not None and Path(args.png_dir).exists() and not Path(args.png_dir).is_dir():
        raise ImatrixError(f"{args.png_dir}: --png-dir is a file, not a folder")
    matrix = _load(args.in_files, args.ctx_size)
    source = ",".join(args.in_files)
    if args.output:
        print(f"wrote {write_report(matrix, args.output, source)}")
    if args.png_dir:
        for path in write_png_dir(matrix, args.png_dir, source):
            print(f"wrote {path}")
    return 0


def _load(in_files: list[str], chunk_size: int) -> ImportanceMatrix:
    # a single file keeps its own chunk metadata; merging recomputes it as llama.cpp does
    if len(in_files) == 1:
        return load_imatrix(in_files[0], chunk_size=chunk_size)
    return load_imatrices(in_files, chunk_size=chunk_size)
