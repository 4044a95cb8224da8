"""Collection speed and memory on SmolLM2-135M F16 (the issue's reference run), beside the sgemm roofline.

Prints one table: load time, tokens/s with and without --no-ppl, wall time, peak RSS, and the fp32
sgemm rate of this machine measured in the same run; a third run, with -b 1024 (each of the two chunks
in flight its own forward) instead of the default -b 2048 (two chunks per forward in each thread), is
the baseline for `collect.executors.CPU_SEQS_PER_FORWARD` (with two threads or more: one thread runs
one chunk at a time, two per forward at either -b). The roofline is the issue's: tokens/s if the
model's whole forward (~0.29 GFLOP per token, output projection included) ran at the sgemm rate
(its fastest repetition; the rate sustained over all repetitions is printed too, it is lower on a
shared VM); beside it, the share against the FLOPs actually executed (no output projection with --no-ppl,
the scored half with perplexity). llama.cpp's figures are the ones measured on the reference
2-core machine.

Each run is repeated (`--repeat`, rounds of the three interleaved) and its fastest is reported beside
every run's rate, as timeit does: on a shared VM the slow runs measure the neighbours, and the roofline
is the fastest sgemm repetition too. Peak RSS is the largest seen.

    python benchmarks/collect_speed.py [--chunks 40] [--threads 2] [--repeat 3]

The issue's reference machine is AVX2-class (torch's sgemm 150–190 GFLOP/s on its two cores). On an
AVX-512 machine, capping torch's and MKL's kernels at AVX2 reproduces that class of sgemm rate, with
everything else (caches, memory bandwidth) of the machine at hand; the table's first line says which
kernels ran:

    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 python benchmarks/collect_speed.py
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
from dataclasses import dataclass
from pathlib import Path

import torch

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.bundled import default_calibration_text, smollm2_path
from imatrix.models.f16 import write_f16_model

LLAMA_CPP = {"tokens/s": 227.0, "wall s (40 chunks)": 88.0, "peak RSS GB": 0.84}
RUNS = (("with PPL", []), ("--no-ppl", ["--no-ppl"]),
        ("--no-ppl, one chunk per forward (-b 1024)", ["--no-ppl", "-b", "1024"]))


@dataclass
class GemmRate:
    best: float  # GFLOP/s of the fastest repetition: the roofline
    sustained: float  # GFLOP/s over all repetitions, what a long run of GEMMs gets on this machine


def sgemm_gflops(threads: int, n_tokens: int = 2048, seconds: float = 3.0) -> GemmRate:
    """fp32 GEMM rate over `seconds` on the model's own shapes (tokens × 576 by 576 × 1536 and back)."""
    torch.set_num_threads(threads)
    x, w_up, w_down = torch.randn(n_tokens, 576), torch.randn(576, 1536), torch.randn(1536, 576)
    flops = 2 * 2 * n_tokens * 576 * 1536
    best, total_flops, first = 0.0, 0, time.perf_counter()
    while time.perf_counter() < first + seconds:
        start = time.perf_counter()
        hidden = x @ w_up
        _ = hidden @ w_down
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
        total_flops += flops
    return GemmRate(best, total_flops / (time.perf_counter() - first) / 1e9)


def flops_per_token(model: GGUFModelFile, n_ctx: int, output_share: float) -> float:
    """Matmul FLOPs per token: 2·params of every block matmul, attention over the causal window, and
    the output projection on `output_share` of the positions (1: the model's full forward, as
    llama.cpp runs it, ~0.29 GFLOP for SmolLM2; 0.5: the scored half; 0: none, with --no-ppl)."""
    block = sum(int(torch.tensor(info.ne).prod()) for name, info in model.tensors.items()
                if name.startswith("blk.") and len(info.ne) == 2)
    n_layer = int(model.arch_value("block_count"))
    d_model = int(model.arch_value("embedding_length"))
    attention = n_layer * 4 * d_model * (n_ctx / 2)
    vocab_rows = model.tensors.get("output.weight", model.tensors["token_embd.weight"]).ne[1]
    return 2 * block + attention + 2 * vocab_rows * d_model * output_share


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) and output of one `imatrix` run in its own child process."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "imatrix.cli.main", *args], stdout=log,
                                 stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"imatrix failed:\n{text}")
    return wall, usage.ru_maxrss / 1e6, text


def measured(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else float("nan")


@dataclass
class Run:
    label: str
    with_ppl: bool
    load_s: list[float]
    tokens_per_s: list[float]
    wall_s: list[float]
    peak_rss_gb: list[float]


def kernel_isa() -> str:
    """The vector instructions torch's own kernels use, and MKL's where an environment variable caps them
    (the issue's reference machine is AVX2-class: its sgemm reaches 150–190 GFLOP/s on two cores)."""
    caps = [f"ATen {torch.backends.cpu.get_cpu_capability()}"]
    caps += [f"{name}={os.environ[name]}" for name in ("MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")
             if name in os.environ]
    return " ".join(caps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three runs, interleaved (default 3)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="imatrix-bench-"))
    model = write_f16_model(smollm2_path(), workdir / "smollm2-f16.gguf")
    model_file = GGUFModelFile(model)
    weights_gb = 4 * sum(int(torch.tensor(i.ne).prod()) for i in model_file.tensors.values()) / 1e9
    # a shared VM's speed drifts: the roofline is the best sgemm rate seen before, between and after the runs
    samples = [sgemm_gflops(args.threads)]
    common = ["-m", str(model), "-f", str(default_calibration_text()), "-c", "512", "--chunks", str(args.chunks),
              "-t", str(args.threads), "-o", str(workdir / "imatrix.gguf")]
    runs = [Run(label, "--no-ppl" not in extra, [], [], [], []) for label, extra in RUNS]
    for _ in range(args.repeat):  # rounds of all three, so that a slow phase of the VM hits each alike
        for run, (_, extra) in zip(runs, RUNS, strict=True):
            wall, rss, log = run_cli(common + extra)
            samples.append(sgemm_gflops(args.threads))
            run.load_s.append(measured(r"loaded .* in ([0-9.]+) s", log))
            run.tokens_per_s.append(measured(r"\(([0-9.]+) tokens/s\)", log))
            run.wall_s.append(wall)
            run.peak_rss_gb.append(rss)
    gflops = max(sample.best for sample in samples)
    model_flops = flops_per_token(model_file, 512, 1.0)
    roofline = gflops * 1e9 / model_flops
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, {kernel_isa()}; fp32 sgemm {gflops:.0f} GFLOP/s "
          f"(best of {', '.join(f'{sample.best:.0f}' for sample in samples)}; sustained over each sample "
          f"{', '.join(f'{sample.sustained:.0f}' for sample in samples)}); "
          f"fp32 weights {weights_gb:.2f} GB; {args.chunks} chunks of 512; "
          f"roofline = sgemm rate / the model's {model_flops / 1e9:.3f} GFLOP per token; "
          f"each run {args.repeat}×: the fastest (and every run's tokens/s), the largest peak RSS")
    print("| run | load s | tokens/s | roofline tokens/s | % of roofline | % of executed FLOPs' roofline | wall s "
          "| peak RSS GB | RSS / fp32 weights | tokens/s of each run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        executed = gflops * 1e9 / flops_per_token(model_file, 512, 0.5 if run.with_ppl else 0.0)
        tps, rss = max(run.tokens_per_s), max(run.peak_rss_gb)
        print(f"| {run.label} | {min(run.load_s):.2f} | {tps:.0f} | {roofline:.0f} | {100 * tps / roofline:.0f}% | "
              f"{100 * tps / executed:.0f}% | {min(run.wall_s):.1f} | {rss:.2f} | {rss / weights_gb:.2f} | "
              f"{', '.join(f'{value:.0f}' for value in run.tokens_per_s)} |")
    print(f"| llama-imatrix (reference machine) | | {LLAMA_CPP['tokens/s']:.0f} | | | | "
          f"{LLAMA_CPP['wall s (40 chunks)']:.0f} | {LLAMA_CPP['peak RSS GB']:.2f} | | |")


if __name__ == "__main__":
    main()
