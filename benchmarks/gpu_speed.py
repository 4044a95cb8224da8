"""Collection speed on a GPU: a random-weight llama (1.1B by default) against the matmul roofline.

Writes a llama GGUF of random Q4_0 blocks (dequantized on load, so any size is quick to make), then
runs `imatrix` on the default calibration text for each compute dtype, and prints tokens/s beside
the roofline: tokens/s if every FLOP of the model ran at the GEMM rate measured in the same run, on
the same device, in the same dtype, on the model's own MLP shapes.

    python benchmarks/gpu_speed.py [--device cuda] [--dtypes bfloat16,float32] [--chunks 40] [-b 8192]

`--device cpu --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2` runs the same
script in a minute on a CPU (a check of the script itself, not a benchmark).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from collect_speed import flops_per_token, timed
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.bundled import default_calibration_text
from memory import write_random_q4_0_llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gemm_tflops(device: str, dtype: torch.dtype, n_tokens: int, hidden: int, intermediate: int) -> float:
    """Best GEMM rate on the model's MLP shapes (tokens × hidden by hidden × intermediate and back)."""
    x = torch.randn(n_tokens, hidden, device=device, dtype=dtype)
    w_up = torch.randn(hidden, intermediate, device=device, dtype=dtype)
    w_down = torch.randn(intermediate, hidden, device=device, dtype=dtype)
    best = 0.0
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _ = (x @ w_up) @ w_down
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * 2 * n_tokens * hidden * intermediate / (time.perf_counter() - start) / 1e12)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("-b", "--batch-size", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="imatrix-gpu-bench-"))
    model = write_random_q4_0_llama(workdir / "random.gguf", args.layers, args.hidden, args.intermediate,
                                    args.heads, args.kv_heads)
    model_file = GGUFModelFile(model)
    n_params = sum(int(torch.tensor(info.ne).prod()) for info in model_file.tensors.values())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name}; torch {torch.__version__}; random llama {n_params / 1e6:.0f}M params "
          f"({args.layers} layers, hidden {args.hidden}); {args.chunks} chunks of 512, -b {args.batch_size}")
    print("| dtype | PPL | tokens/s | GEMM TFLOP/s | roofline tokens/s | % of roofline | wall s | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        rate = gemm_tflops(args.device, DTYPES[dtype_name], args.batch_size, args.hidden, args.intermediate)
        for with_ppl in (True, False):
            extra = [] if with_ppl else ["--no-ppl"]
            wall, _, log = timed([sys.executable, "-m", "imatrix.cli.main", "-m", str(model), "-f",
                                  str(default_calibration_text()), "-c", "512", "--chunks", str(args.chunks), "-b",
                                  str(args.batch_size), "--device", args.device, "--dtype", dtype_name, "-o",
                                  str(workdir / "imatrix.gguf"), "-lv", "3", *extra])
            tps = float(re.search(r"\(([0-9.]+) tokens/s\)", log).group(1))
            load = re.search(r"loaded .* in ([0-9.]+) s", log)
            roofline = rate * 1e12 / flops_per_token(model_file, 512)
            print(f"| {dtype_name} | {'yes' if with_ppl else 'no'} | {tps:.0f} | {rate:.2f} | {roofline:.0f} | "
                  f"{100 * tps / roofline:.0f}% | {wall:.1f} | {load.group(1) if load else '–'} |", flush=True)


if __name__ == "__main__":
    main()
