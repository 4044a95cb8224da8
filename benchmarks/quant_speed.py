"""Quantization speed and memory on SmolLM2-135M F16, beside llama-quantize's own times.

Runs `imatrix quantize` for every type of the golden `quality.md` that we support, with and without
the golden imatrix, in a child process with 2 worker threads (as llama-quantize was timed), and
prints wall time, the ratio to llama-quantize's time (target: at most 2x), and peak RSS against the
input file's size (target: at most 2x).

    python benchmarks/quant_speed.py [--types Q4_0,Q4_K_M] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from collect_speed import run_cli
from imatrix.models.bundled import smollm2_path
from imatrix.models.f16 import write_f16_model
from imatrix.quant.mixes import FILE_TYPES
from quant_quality import IMATRIX, QUALITY_MD, parse_quality

MIB = 1024 * 1024


def main() -> None:
    theirs = parse_quality(QUALITY_MD)
    supported = [name for name in dict.fromkeys(t for t, _ in theirs) if name in FILE_TYPES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(supported))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="imatrix-quant-speed-"))
    source = write_f16_model(smollm2_path(), workdir / "smollm2-f16.gguf")
    input_gb = source.stat().st_size / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; input {source.stat().st_size / MIB:.1f} MiB (F16)")
    print("| type | imatrix | ours s | llama-quantize s | ratio | peak RSS GB | RSS / input |")
    print("|---|---|---|---|---|---|---|")
    for qtype in args.types.split(","):
        for with_imatrix in (False, True):
            extra = ["--imatrix", str(IMATRIX)] if with_imatrix else []
            out = workdir / f"{qtype}-{'im' if with_imatrix else 'noim'}.gguf"
            wall, rss, _ = run_cli(["quantize", *extra, str(source), str(out), qtype, str(args.threads)])
            reference = theirs.get((qtype, with_imatrix), {}).get("quantize_s")
            ratio = f"{wall / reference:.2f}x" if reference else "–"
            print(f"| {qtype} | {'yes' if with_imatrix else 'no'} | {wall:.1f} | {reference or '–'} | {ratio} | "
                  f"{rss:.2f} | {rss / input_gb:.2f} |", flush=True)
            out.unlink()


if __name__ == "__main__":
    main()
