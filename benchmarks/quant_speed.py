"""Quantization speed and memory on SmolLM2-135M F16, beside llama-quantize's own times.

Runs `imatrix quantize` for every type of the golden `quality.md` that we support, with and without
the golden imatrix, in a child process with 2 workers (as llama-quantize was timed with 2 threads),
and prints wall time, the ratio to llama-quantize's time (target: at most 2x), and peak memory
against the input file's size (target: at most 2x). Memory is the peak, sampled every 20 ms, of the
summed PSS of the whole process tree (the command and its forked workers, shared pages counted
once). The child's `ru_maxrss` would not do: Linux carries the spawning process's peak across exec.

llama-quantize's times are the golden figures of the reference machine; with `--llama-quantize PATH`
(a llama.cpp build) it is also run here, on the same input with the same threads, its time is the
baseline of a second ratio, and the two output files are compared tensor by tensor.

Each command runs `--repeats` times (ours and llama-quantize alternating) and the fastest run counts.

    python benchmarks/quant_speed.py [--types Q4_0,Q4_K_M] [--threads 2] [--repeats 3] [--llama-quantize PATH]
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

import numpy as np

from imatrix.ggufio.reader import GGUFModelFile
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


def run_quantize(command: list[str]) -> tuple[float, float]:
    """Wall seconds and the peak PSS of the process tree (GB)."""
    # the output goes to a file, not a pipe: llama-quantize would block once a pipe's buffer is full
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = PeakTreePss(child.pid)
        status = child.wait()
        wall = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            raise SystemExit(f"{command[0]} failed:\n{log.read()[-4000:]}")
    return wall, peak.result() / 1e9


class PeakTreePss:
    """Samples the summed PSS of `pid`'s process tree every 20 ms until `result()` (called once it has exited)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, sum(pss_bytes(pid) for pid in process_tree(self.pid)))
            time.sleep(0.02)

    def result(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def same_tensors(ours: Path, theirs: Path) -> str:
    """How many tensors of the two files hold the same type and bytes, as `n/total`."""
    a, b = GGUFModelFile(ours), GGUFModelFile(theirs)
    same = sum(
        name in b.tensors and a.tensors[name].tensor_type == b.tensors[name].tensor_type
        and np.array_equal(a.raw(name), b.raw(name))
        for name in a.tensors
    )
    return f"{same}/{len(b.tensors)}"


def main() -> None:
    theirs = parse_quality(QUALITY_MD)
    supported = [name for name in dict.fromkeys(t for t, _ in theirs)
                 if name in FILE_TYPES and FILE_TYPES[name].kernels_ready]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(supported))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-quantize", metavar="PATH", help="a llama-quantize binary to time here too")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command; the fastest is reported")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="imatrix-quant-speed-"))
    source = write_f16_model(smollm2_path(), workdir / "smollm2-f16.gguf")
    input_gb = source.stat().st_size / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads; input {source.stat().st_size / MIB:.1f} MiB (F16)")
    here = " | llama-quantize here s | ratio here | same tensors" if args.llama_quantize else ""
    print(f"| type | imatrix | ours s | llama-quantize s (reference) | ratio{here} | peak PSS GB (all processes) "
          "| PSS / input |")
    print("|---" * (7 + 3 * bool(args.llama_quantize)) + "|")
    for qtype in args.types.split(","):
        for with_imatrix in (False, True):
            extra = ["--imatrix", str(IMATRIX)] if with_imatrix else []
            out = workdir / f"{qtype}-{'im' if with_imatrix else 'noim'}.gguf"
            ours = [sys.executable, "-m", "imatrix.cli.main", "quantize", *extra, str(source), str(out), qtype,
                    str(args.threads)]
            their_out = workdir / f"llama-{out.name}"
            theirs_cmd = [args.llama_quantize, *extra, str(source), str(their_out), qtype, str(args.threads)]
            # best of --repeats, the two programs alternating: this VM's speed drifts from second to second
            walls, their_walls, pss = [], [], 0.0
            for _ in range(args.repeats):
                wall, peak = run_quantize(ours)
                walls.append(wall)
                pss = max(pss, peak)
                if args.llama_quantize:
                    their_walls.append(run_quantize(theirs_cmd)[0])
            wall = min(walls)
            reference = theirs.get((qtype, with_imatrix), {}).get("quantize_s")
            cells = [qtype, "yes" if with_imatrix else "no", f"{wall:.2f}", f"{reference or '–'}",
                     f"{wall / reference:.2f}x" if reference else "–"]
            if args.llama_quantize:
                their_wall = min(their_walls)
                cells += [f"{their_wall:.2f}", f"{wall / their_wall:.2f}x", same_tensors(out, their_out)]
                their_out.unlink()
            cells += [f"{pss:.2f}", f"{pss / input_gb:.2f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
            out.unlink()


if __name__ == "__main__":
    main()
