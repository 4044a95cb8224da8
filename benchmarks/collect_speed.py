"""Collection speed beside llama-imatrix, side by side in one run: SmolLM2-135M, calibration.txt, -c 512.

Each round runs, one after the other so that a slow phase of a shared machine hits every run alike:
llama-imatrix on the F16, BF16 and Q8_0 models (with and without --no-ppl), and `imatrix` with default
flags on the F16 model (and on BF16), all with the same threads. Every run is a whole process, timed from
start to exit; the table reports the fastest of the rounds (as timeit does) and the largest peak RSS. The
ratio is llama-imatrix's fastest model against our default run, per mode. The rooflines are the fp32 and
bf16 matmul rates measured in the same run on the model's own shapes (best repetition), divided by the
model's FLOPs per token.

    python benchmarks/collect_speed.py --llama-imatrix PATH [--chunks 40] [--threads 2] [--repeat 3]
        [--compare-src DIR]

Without --llama-imatrix only our runs are made. With `--compare-src DIR` (another checkout, e.g. a
`git worktree` of an earlier commit) its `imatrix` runs on the F16 model in the same rounds, beside ours
with `--dtype float32` (what that code computed in, before `--dtype auto`): before and after, like for like.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.bundled import default_calibration_text, smollm2_path
from imatrix.models.f16 import write_f16_model
from imatrix.models.precision import cpu_has_bf16_dot
from imatrix.quant.model import quantize_model

MODES = (("with PPL", []), ("--no-ppl", ["--no-ppl"]))
FLOAT32 = "imatrix --dtype float32"


@dataclass
class Run:
    tool: str  # "llama-imatrix", "imatrix", "imatrix --dtype float32" or "imatrix at DIR"
    model: str  # F16, BF16, Q8_0
    mode: str
    walls: list[float] = field(default_factory=list)
    rss_gb: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)


def matmul_gflops(dtype: torch.dtype, threads: int, n_tokens: int = 2048, seconds: float = 2.0) -> float:
    """The best rate of `dtype` matmuls on the model's shapes (tokens × 576 by 576 × 1536 and back)."""
    torch.set_num_threads(threads)
    x = torch.randn(n_tokens, 576, dtype=dtype)
    w_up, w_down = torch.randn(576, 1536, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    flops, best, first = 2 * 2 * n_tokens * 576 * 1536, 0.0, time.perf_counter()
    while time.perf_counter() < first + seconds:
        start = time.perf_counter()
        _ = (x @ w_up) @ w_down
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_token(model: GGUFModelFile, n_ctx: int) -> float:
    """Matmul FLOPs per token of the model's whole forward, as llama.cpp runs it (output projection included)."""
    block = sum(int(torch.tensor(info.ne).prod()) for name, info in model.tensors.items()
                if name.startswith("blk.") and len(info.ne) == 2)
    n_layer, d_model = int(model.arch_value("block_count")), int(model.arch_value("embedding_length"))
    vocab_rows = model.tensors.get("output.weight", model.tensors["token_embd.weight"]).ne[1]
    return 2 * block + n_layer * 4 * d_model * (n_ctx / 2) + 2 * vocab_rows * d_model


def timed(command: list[str], source: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) and output of one process (importing the package from `source`/src)."""
    env = {**os.environ, "PYTHONPATH": str(source / "src")} if source else None
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1e6, text


def models(workdir: Path) -> dict[str, Path]:
    f16 = write_f16_model(smollm2_path(), workdir / "smollm2-f16.gguf")
    made = {"F16": f16}
    for ftype in ("BF16", "Q8_0"):
        made[ftype] = workdir / f"smollm2-{ftype.lower()}.gguf"
        quantize_model(f16, made[ftype], ftype, allow_requantize=True)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-imatrix", type=Path, help="llama-imatrix binary to compare with")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds, interleaved (default 3)")
    parser.add_argument("--compare-src", type=Path, metavar="DIR",
                        help="another checkout whose imatrix runs beside ours (--dtype float32) on the F16 model")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="imatrix-bench-"))
    files = models(workdir)
    common = ["-f", str(default_calibration_text()), "-c", "512", "--chunks", str(args.chunks),
              "-t", str(args.threads), "-o", str(workdir / "out.gguf")]
    plan = [Run("imatrix", name, mode) for name in ("F16", "BF16") for mode, _ in MODES]
    if args.compare_src:
        plan += [Run(tool, "F16", mode) for tool in (FLOAT32, f"imatrix at {args.compare_src}") for mode, _ in MODES]
    if args.llama_imatrix:
        plan += [Run("llama-imatrix", name, mode) for name in files for mode, _ in MODES]
    rates = {dtype: [] for dtype in (torch.float32, torch.bfloat16)}
    for _ in range(args.repeat):
        for run in plan:
            extra = dict(MODES)[run.mode] + (["--dtype", "float32"] if run.tool == FLOAT32 else [])
            command = ([str(args.llama_imatrix)] if run.tool == "llama-imatrix"
                       else [sys.executable, "-m", "imatrix.cli.main"])
            source = args.compare_src if run.tool.startswith("imatrix at") else None
            wall, rss, log = timed([*command, "-m", str(files[run.model]), *common, *extra], source)
            run.walls.append(wall)
            run.rss_gb.append(rss)
            tokens = re.search(r"\(([0-9.]+) tokens/s\)", log)
            run.tokens_per_s.append(float(tokens.group(1)) if tokens else float("nan"))
        for dtype, samples in rates.items():
            samples.append(matmul_gflops(dtype, args.threads))
    report(plan, rates, GGUFModelFile(files["F16"]), args)


def report(plan: list[Run], rates: dict[torch.dtype, list[float]], model: GGUFModelFile,
           args: argparse.Namespace) -> None:
    per_token = flops_per_token(model, 512)
    fp32, bf16 = max(rates[torch.float32]), max(rates[torch.bfloat16])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, native bf16 dot "
          f"products: {cpu_has_bf16_dot()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads, {args.chunks} chunks of 512, {args.repeat} rounds")
    print(f"matmul rates: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s; rooflines (whole forward, "
          f"{per_token / 1e9:.3f} GFLOP per token): fp32 {fp32 * 1e9 / per_token:.0f}, "
          f"bf16 {bf16 * 1e9 / per_token:.0f} tokens/s")
    print("| tool | model | mode | wall s (fastest) | walls | tokens/s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for run in plan:
        print(f"| {run.tool} | {run.model} | {run.mode} | {min(run.walls):.1f} | "
              f"{', '.join(f'{wall:.1f}' for wall in run.walls)} | {max(run.tokens_per_s):.0f} | "
              f"{max(run.rss_gb):.2f} |")
    for mode, _ in MODES:
        ours = min(min(run.walls) for run in plan if run.tool == "imatrix" and run.model == "F16" and run.mode == mode)
        theirs = [run for run in plan if run.tool == "llama-imatrix" and run.mode == mode]
        if theirs:
            fastest = min(theirs, key=lambda run: min(run.walls))
            print(f"{mode}: imatrix (defaults, F16) {ours:.1f} s against llama-imatrix's fastest "
                  f"({fastest.model}) {min(fastest.walls):.1f} s: {min(fastest.walls) / ours:.2f}x")
        before = [run for run in plan if run.tool.startswith("imatrix at") and run.mode == mode]
        if before:
            same_dtype = next(run for run in plan if run.tool == FLOAT32 and run.mode == mode)
            print(f"{mode}: {same_dtype.tool} {min(same_dtype.walls):.1f} s against {before[0].tool} "
                  f"{min(before[0].walls):.1f} s: {min(before[0].walls) / min(same_dtype.walls):.2f}x")


if __name__ == "__main__":
    main()
