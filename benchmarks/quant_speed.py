"""Quantization speed and memory on SmolLM2-135M F16, beside llama-quantize's own times.

Runs `imatrix quantize` for every type of the golden `quality.md` that we support, with and without
the golden imatrix, in a child process with 2 workers (as llama-quantize was timed with 2 threads),
and prints wall time, the ratio to llama-quantize's time (target: at most 2x), and peak memory
against the input file's size (target: at most 2x). Memory is the peak, sampled every 20 ms, of the
summed PSS of the whole process tree (the command and its forked workers, shared pages counted
once), beside the peak RSS of its largest process.

    python benchmarks/quant_speed.py [--types Q4_0,Q4_K_M] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from imatrix.models.bundled import smollm2_path
from imatrix.models.f16 import write_f16_model
from imatrix.quant.mixes import FILE_TYPES
from quant_quality import IMATRIX, QUALITY_MD, parse_quality

MIB = 1024 * 1024


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return tree


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_quantize(args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak PSS of the process tree (GB) and the peak RSS of its largest process (GB)."""
    peak = 0
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "imatrix.cli.main", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(pss_bytes(pid) for pid in process_tree(child.pid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"imatrix failed:\n{child.stderr.read() if child.stderr else ''}")
    return wall, peak / 1e9, usage.ru_maxrss / 1e6


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
    print("| type | imatrix | ours s | llama-quantize s | ratio | peak PSS GB (all processes) | PSS / input "
          "| largest process peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for qtype in args.types.split(","):
        for with_imatrix in (False, True):
            extra = ["--imatrix", str(IMATRIX)] if with_imatrix else []
            out = workdir / f"{qtype}-{'im' if with_imatrix else 'noim'}.gguf"
            wall, pss, rss = run_quantize(["quantize", *extra, str(source), str(out), qtype, str(args.threads)])
            reference = theirs.get((qtype, with_imatrix), {}).get("quantize_s")
            ratio = f"{wall / reference:.2f}x" if reference else "–"
            print(f"| {qtype} | {'yes' if with_imatrix else 'no'} | {wall:.1f} | {reference or '–'} | {ratio} | "
                  f"{pss:.2f} | {pss / input_gb:.2f} | {rss:.2f} |", flush=True)
            out.unlink()


if __name__ == "__main__":
    main()
