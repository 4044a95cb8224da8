"""Collection speed per architecture family, beside llama-imatrix, on the tiny golden models of tests/architectures.

    python benchmarks/family_speed.py [--llama-imatrix PATH] [--chunks 16] [--threads 2] [--names llama,gemma3]

Each golden folder's `model.gguf` (a few layers of width 32–64, random weights) is collected from
calibration.txt with `-c 128 --chunks N`, by `imatrix` with default flags and by llama-imatrix, one after
the other, each as a whole process. At these sizes a token costs a few kFLOPs of matmul, so the figures
measure what an architecture adds per token outside the matmuls (its adapter's hooks, observers,
routing, recurrent layers), not the matmul rate: a family far below the dense llama row spends its time
in Python. The compute rate is ours as printed (tokens/s of the forward passes, load and start-up
excluded), and per layer (times the layers: the tiny models have 2 to 64); the walls are whole processes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.bundled import default_calibration_text

REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "architectures"


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-imatrix", type=Path, help="llama-imatrix binary to compare with")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--names", help="comma-separated golden folders (default: every one with a model.gguf)")
    args = parser.parse_args()
    names = args.names.split(",") if args.names else sorted(p.parent.name for p in GOLDENS.glob("*/model.gguf"))
    print(f"{args.chunks} chunks of 128 tokens, {args.threads} threads")
    print("| model | layers | params | ours tokens/s (compute) | ours layer-tokens/s | ours wall s "
          "| llama-imatrix wall s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            model = GOLDENS / name / "model.gguf"
            common = ["-m", str(model), "-f", str(default_calibration_text()), "-c", "128", "--chunks",
                      str(args.chunks), "-t", str(args.threads), "-o", str(Path(scratch) / "out.gguf")]
            wall, log = timed([sys.executable, "-m", "imatrix.cli.main", *common])
            rate = re.search(r"\(([0-9.]+) tokens/s\)", log)
            theirs = f"{timed([str(args.llama_imatrix), *common])[0]:.2f}" if args.llama_imatrix else "–"
            n_params, n_layers = size(model)
            per_layer = f"{float(rate.group(1)) * n_layers:.0f}" if rate else "–"
            print(f"| {name} | {n_layers} | {n_params / 1e6:.2f}M | {rate.group(1) if rate else '–'} | {per_layer} "
                  f"| {wall:.2f} | {theirs} |", flush=True)


def size(model: Path) -> tuple[int, int]:
    """Parameters and layers of a GGUF model."""
    opened, total = GGUFModelFile(model), 0
    for info in opened.tensors.values():
        count = 1
        for extent in info.ne:
            count *= extent
        total += count
    return total, int(opened.require_arch("block_count"))


if __name__ == "__main__":
    main()
