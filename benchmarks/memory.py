"""Peak memory of in-memory vs layer-by-layer (`--sequential`) collection.

Two models, each run by the `imatrix` command in its own child process (peak RSS from `wait4`):

* SmolLM2-135M (the bundled Q4_1 GGUF), in memory and sequentially;
* a random-weight llama written here as Q4_0, whose float32 weights are at least 3x an address-space
  limit (`RLIMIT_AS`) imposed on the child: in memory it cannot load; without any flag the size
  check picks `--sequential` by itself and the run completes under the limit.

    python benchmarks/memory.py [--limit-gb 3.5] [--layers 66] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imatrix.ggufio.reader import GGUFModelFile  # noqa: E402
from imatrix.models.bundled import default_calibration_text, smollm2_path  # noqa: E402
from tiny_models import tiny_llama_config, write_metadata  # noqa: E402

GB = 1024**3
Q4_0 = gguf.GGMLQuantizationType.Q4_0


@dataclass
class Run:
    model: str
    mode: str
    limit: str
    peak_rss_gb: float
    wall_s: float
    outcome: str


def write_random_q4_0_llama(path: Path, n_layers: int, hidden: int, intermediate: int, heads: int,
                            kv_heads: int, seed: int = 0) -> Path:
    """A llama GGUF whose matrices are random Q4_0 blocks (scale 0.01): no float32 copy is ever made."""
    config = tiny_llama_config(n_layers=n_layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                               intermediate=intermediate)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    write_metadata(writer, config)
    writer.add_tensor("token_embd.weight", _random_q4_0(rng, config.vocab_size, hidden), raw_dtype=Q4_0)
    for block in range(n_layers):
        shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden),
                  "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
                  "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden),
                  "ffn_down": (hidden, intermediate)}
        for name, (rows, cols) in shapes.items():
            writer.add_tensor(f"blk.{block}.{name}.weight", _random_q4_0(rng, rows, cols), raw_dtype=Q4_0)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", _random_q4_0(rng, config.vocab_size, hidden), raw_dtype=Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _random_q4_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    blocks = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
    blocks[..., :2] = np.full((rows, cols // 32), 0.01, dtype=np.float16).view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


def float32_bytes(path: Path) -> int:
    return sum(int(np.prod(info.ne)) for info in GGUFModelFile(path).tensors.values()) * 4


def run_imatrix(args: list[str], limit: int | None, threads: int) -> tuple[float, float, int, str]:
    """Peak RSS (GB), wall seconds, exit code and stderr tail of one `imatrix` child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_ARENA_MAX": "2"}

    def limit_memory() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, "-m", "imatrix.cli.main", *args, "-t", str(threads), "--device", "cpu"]
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=limit_memory)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    return usage.ru_maxrss * 1024 / GB, wall, child.returncode, output


def outcome(code: int, output: str) -> str:
    if code == 0:
        final = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
        mode = " (auto: sequential)" if "running layer by layer" in output else ""
        return f"ok, PPL {final.group(1)}{mode}" if final else f"ok{mode}"
    errors = [line for line in output.splitlines() if re.search(r"Error|error:", line)]
    return f"failed (exit {code}): {(errors or ['?'])[-1][:90]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-gb", type=float, default=3.5, help="RLIMIT_AS for the large model's runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=66, help="layers of the random model (hidden 2048)")
    parser.add_argument("--smollm-chunks", type=int, default=4)
    options = parser.parse_args()
    text = default_calibration_text()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "imatrix.gguf")
        smollm = smollm2_path()
        base = ["-m", str(smollm), "-f", str(text), "-o", out, "-c", "512", "-b", "512",
                "--chunks", str(options.smollm_chunks)]
        for mode in ("--no-sequential", "--sequential"):
            rss, wall, code, output = run_imatrix([*base, mode], None, options.threads)
            runs.append(Run("SmolLM2-135M Q4_1", mode.lstrip("-"), "none", rss, wall, outcome(code, output)))

        limit = int(options.limit_gb * GB)
        big = write_random_q4_0_llama(Path(tmp) / "random.gguf", options.layers, 2048, 5632, 16, 4)
        weights = float32_bytes(big)
        label = f"random llama {weights / GB:.1f} GB f32 ({big.stat().st_size / GB:.2f} GB Q4_0)"
        big_args = ["-m", str(big), "-f", str(text), "-o", out, "-c", "64", "-b", "128", "--chunks", "2"]
        for mode in ("--no-sequential", None):
            args = big_args if mode is None else [*big_args, mode]
            rss, wall, code, output = run_imatrix(args, limit, options.threads)
            runs.append(Run(label, mode.lstrip("-") if mode else "auto", f"{options.limit_gb:g} GB AS", rss, wall,
                            outcome(code, output)))
    print_table(runs, weights / limit)


def print_table(runs: list[Run], ratio: float) -> None:
    print(f"\nrandom model float32 weights / memory limit = {ratio:.1f}x\n")
    print("| model | mode | limit | peak RSS GB | wall s | outcome |")
    print("|---|---|---|---:|---:|---|")
    for run in runs:
        print(f"| {run.model} | {run.mode} | {run.limit} | {run.peak_rss_gb:.2f} | {run.wall_s:.1f} | {run.outcome} |")


if __name__ == "__main__":
    main()
