"""Quantization speed and memory on a 1B-parameter model made of SmolLM2's weights, beside llama-quantize.

    python benchmarks/quant_speed.py --llama-quantize PATH [--work-dir DIR] [--types Q4_K_M,Q2_K,...]
        [--width 4] [--layers 16] [--threads 2] [--repeats 1] [--no-imatrix]

The model: SmolLM2-135M's F16 weights (rebuilt from the bundled Q4_1, exactly llama-quantize's F16),
every matrix tiled `--width` times along both dimensions (the embedding along its rows only) and the
blocks repeated to `--layers` layers (block i is SmolLM2's block i mod 30). With the defaults that is
hidden 2304, feed-forward 6144, 16 layers: 1.02B parameters, 2.0 GB of F16, shapes of a real 1B
llama, whose rows (multiples of 256) take the K- and i-quants rather than SmolLM2's fallbacks. The
imatrix is the golden `smollm2-f16.c512.n40.imatrix.gguf` tiled the same way. Both are written once
into the work directory (outside the repository; default /tmp/imatrix-quant-speed) and reused.

For every type, `imatrix quantize` and llama-quantize run on the same input with the same threads, one
after the other (`--repeats` times, alternating; the fastest run counts), each as a fresh process
started under `/usr/bin/time`, which gives the peak resident set of the largest process of its tree
(for us: the parent or one of its forked workers). The summed PSS of the whole tree (shared pages
counted once) is sampled every 100 ms as well. Outputs are compared tensor by tensor.

Start-up: the wall time of `imatrix quantize --help`, and of `--dry-run` on the big model (everything
but the conversion: imports, opening the model, reading the imatrix, planning every tensor's type)
beside llama-quantize's `--dry-run`.

Types whose kernels this project does not have yet (`FileType.kernels_ready`) are skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from imatrix.formats import load_imatrix, save_imatrix
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.ggufio.writer import ModelWriter
from imatrix.matrix import ImportanceMatrix, TensorStats

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMATRIX_SHARED", REPO.parent / "shared"))
GOLDEN_IMATRIX = SHARED / "golden" / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf"
TYPES = ("Q4_K_M", "Q2_K", "IQ2_XXS", "IQ3_XXS", "IQ4_XS")
GIB = 1024**3
MIB = 1024**2
TIME = "/usr/bin/time"
# the metadata keys that grow with the width (heads keep their size: there are `width` times as many)
WIDENED_KEYS = ("embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv")


# --- the big model and its imatrix ---


def source_block(layer: int, n_source_layers: int) -> int:
    return layer % n_source_layers


def tiled(weights: np.ndarray, width: int, is_embedding: bool) -> np.ndarray:
    """`weights` (numpy order: rows first) tiled `width` times along each dimension; the token
    embedding keeps its rows (one per token) and a norm is a single row."""
    if weights.ndim == 1:
        return np.tile(weights, width)
    return np.tile(weights, (1, width) if is_embedding else (width, width))


def big_tensor_names(source: GGUFModelFile, n_layers: int) -> list[tuple[str, str]]:
    """(name in the big model, name in SmolLM2) for every tensor, the non-block ones first."""
    n_source = int(source.require_arch("block_count"))
    outside = [(name, name) for name in source.tensors if not name.startswith("blk.")]
    blocks = [name.split(".", 2)[2] for name in source.tensors if name.startswith("blk.0.")]
    inside = [(f"blk.{layer}.{rest}", f"blk.{source_block(layer, n_source)}.{rest}")
              for layer in range(n_layers) for rest in blocks]
    return outside + inside


def write_big_model(f16_path: Path, dst: Path, width: int, n_layers: int) -> Path:
    """SmolLM2's F16 tiled `width` times and repeated to `n_layers` blocks, written tensor by tensor."""
    source = GGUFModelFile(f16_path)
    arch = source.architecture
    changed = {f"{arch}.{key}": int(source.require_arch(key)) * width for key in WIDENED_KEYS}
    changed[f"{arch}.block_count"] = n_layers
    changed["general.size_label"] = f"tiled x{width}, {n_layers} layers"
    names = big_tensor_names(source, n_layers)
    tmp = dst.with_suffix(".tmp")
    writer = ModelWriter(tmp, "")
    writer.kv_data[0].clear()  # every key comes from the source, general.architecture included
    for key, stored in source.fields.items():
        value = changed.get(key, stored.value)
        writer.add_key_value(key, value, stored.value_type, sub_type=stored.item_type)
    for name, src_name in names:
        info = source.tensors[src_name]
        shape = tiled(np.empty(info.shape, dtype=np.uint8), width, name == "token_embd.weight").shape
        itemsize = 4 if info.tensor_type == gguf.GGMLQuantizationType.F32 else 2
        dtype = np.float32 if itemsize == 4 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, src_name in names:
        info = source.tensors[src_name]
        dtype = np.float32 if info.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16
        weights = source.raw(src_name).view(dtype).reshape(info.shape)
        writer.write_tensor_data(tiled(weights, width, name == "token_embd.weight"))
    writer.close()
    tmp.rename(dst)
    return dst


def write_big_imatrix(src: Path, dst: Path, width: int, n_layers: int, n_source_layers: int) -> Path:
    """The golden imatrix tiled as the model: each entry's columns `width` times, blocks repeated."""
    golden = load_imatrix(src)
    big = ImportanceMatrix(chunk_size=golden.chunk_size, chunk_count=golden.chunk_count,
                           datasets=list(golden.datasets))
    for name in golden.names():
        if not name.startswith("blk."):
            continue
        layer, rest = name.split(".", 2)[1:]
        if int(layer) != 0:
            continue
        for big_layer in range(n_layers):
            stats = golden[f"blk.{source_block(big_layer, n_source_layers)}.{rest}"]
            big.tensors[f"blk.{big_layer}.{rest}"] = TensorStats(np.tile(stats.sums, (1, width)), stats.counts)
    save_imatrix(big, dst)
    return dst


def prepare(work: Path, width: int, n_layers: int) -> tuple[Path, Path]:
    """The big F16 model and its imatrix in `work`, made unless already there."""
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"smollm2-x{width}-{n_layers}l-f16.gguf"
    imatrix = work / f"smollm2-x{width}-{n_layers}l.imatrix.gguf"
    if not model.exists() or not imatrix.exists():
        from imatrix.models.bundled import smollm2_path
        from imatrix.models.f16 import write_f16_model

        small = work / "smollm2-f16.gguf"
        if not small.exists():
            write_f16_model(smollm2_path(), small)
        if not model.exists():
            log(f"writing {model}")
            write_big_model(small, model, width, n_layers)
        if not imatrix.exists():
            n_source = int(GGUFModelFile(small).require_arch("block_count"))
            write_big_imatrix(GOLDEN_IMATRIX, imatrix, width, n_layers, n_source)
    return model, imatrix


# --- measuring a command ---


@dataclass
class Run:
    wall: float  # seconds
    cpu: float  # seconds of CPU (user + system) of the whole tree: robust to other load on a shared machine
    max_rss: int  # bytes: the largest resident set of any one process of the tree (/usr/bin/time's %M)
    tree_pss: int  # bytes: the peak of the summed PSS of the whole tree, sampled


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


class PeakTreePss:
    """Samples the summed PSS of `pid`'s process tree every 100 ms until `result()` (called once it has exited)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.1):
            self.peak = max(self.peak, sum(pss_bytes(pid) for pid in process_tree(self.pid)))

    def result(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def run_measured(command: Sequence[str]) -> Run:
    """Run `command` under /usr/bin/time (a small process, so that the peak it reports is the command's,
    not that of this Python process, whose peak a child inherits across exec); raises if it fails."""
    with tempfile.TemporaryDirectory() as scratch:
        rss_file = Path(scratch) / "rss"
        # the output goes to a file, not a pipe: llama-quantize would block once a pipe's buffer is full
        with open(Path(scratch) / "log", "w+") as log_file:
            start = time.perf_counter()
            child = subprocess.Popen([TIME, "-f", "%U %S %M", "-o", str(rss_file), *command], stdout=log_file,
                                     stderr=subprocess.STDOUT, text=True)
            sampler = PeakTreePss(child.pid)
            status = child.wait()
            wall = time.perf_counter() - start
            tree_pss = sampler.result()
            if status != 0:
                log_file.seek(0)
                raise SystemExit(f"{' '.join(command)} failed:\n{log_file.read()[-4000:]}")
        user, system, max_rss = rss_file.read_text().split()[-3:]
    return Run(wall, float(user) + float(system), int(max_rss) * 1024, tree_pss)


def best(runs: Sequence[Run]) -> Run:
    """The fastest run's time, and the largest memory of all runs."""
    return Run(min(run.wall for run in runs), min(run.cpu for run in runs), max(run.max_rss for run in runs),
               max(run.tree_pss for run in runs))


def same_tensors(ours: Path, theirs: Path) -> str:
    """How many tensors of the two files hold the same type and bytes, as `n/total`."""
    a, b = GGUFModelFile(ours), GGUFModelFile(theirs)
    same = 0
    for name, info in a.tensors.items():
        other = b.tensors.get(name)
        if other is not None and info.tensor_type == other.tensor_type and np.array_equal(a.raw(name), b.raw(name)):
            same += 1
        a.release_pages(name)
        if other is not None:
            b.release_pages(name)
    return f"{same}/{len(b.tensors)}"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the benchmark ---


def ours_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "imatrix.cli.main", "quantize", *args]


def cells(ours: Run, theirs: Run | None, unit: int, digits: int) -> list[str]:
    """Wall and CPU seconds of both with their ratios, then peak RSS and tree PSS of both (in `unit` bytes)."""
    def size(value: int) -> str:
        return f"{value / unit:.{2 if unit == GIB else 0}f}"

    if theirs is None:
        return [f"{ours.wall:.{digits}f}", "–", "–", f"{ours.cpu:.{digits}f}", "–", "–", size(ours.max_rss), "–",
                size(ours.tree_pss), "–"]
    return [f"{ours.wall:.{digits}f}", f"{theirs.wall:.{digits}f}", f"{ours.wall / theirs.wall:.2f}x",
            f"{ours.cpu:.{digits}f}", f"{theirs.cpu:.{digits}f}", f"{ours.cpu / theirs.cpu:.2f}x",
            size(ours.max_rss), size(theirs.max_rss), size(ours.tree_pss), size(theirs.tree_pss)]


def both(ours: list[str], theirs: list[str] | None, repeats: int) -> tuple[Run, Run | None]:
    """Each command run `repeats` times, alternating (this VM's speed drifts from second to second)."""
    runs, their_runs = [], []
    for _ in range(repeats):
        runs.append(run_measured(ours))
        if theirs:
            their_runs.append(run_measured(theirs))
    return best(runs), best(their_runs) if their_runs else None


def startup_rows(model: Path, imatrix: Path, llama_quantize: str | None, threads: int, repeats: int) -> list[str]:
    """Markdown rows: `--help`, and a dry run of Q4_K_M with imatrix on the big model (ours and theirs)."""
    help_run, _ = both(ours_command("--help"), None, repeats)
    rows = ["| `quantize --help` | " + " | ".join(cells(help_run, None, MIB, 2)) + " |"]
    dry = ["--dry-run", "--imatrix", str(imatrix), str(model), "Q4_K_M", str(threads)]
    ours, theirs = both(ours_command(*dry), [llama_quantize, *dry] if llama_quantize else None, repeats)
    rows.append("| `quantize --dry-run --imatrix IM MODEL Q4_K_M` | " + " | ".join(cells(ours, theirs, MIB, 2)) + " |")
    return rows


def type_row(qtype: str, model: Path, imatrix: Path | None, work: Path, llama_quantize: str | None,
             threads: int, repeats: int, compare: bool) -> str:
    extra = ["--imatrix", str(imatrix)] if imatrix else []
    out, their_out = work / f"ours-{qtype}.gguf", work / f"llama-{qtype}.gguf"
    theirs_command = [llama_quantize, *extra, str(model), str(their_out), qtype, str(threads)] if llama_quantize \
        else None
    ours, theirs = both(ours_command(*extra, str(model), str(out), qtype, str(threads)), theirs_command, repeats)
    same = same_tensors(out, their_out) if compare and theirs else "–"
    out.unlink()
    their_out.unlink(missing_ok=True)
    return "| " + " | ".join([qtype, "yes" if imatrix else "no", *cells(ours, theirs, GIB, 1), same]) + " |"


HEADS = ("ours wall s | llama-quantize wall s | wall ratio | ours CPU s | llama-quantize CPU s | CPU ratio | "
         "ours peak RSS {unit} | llama-quantize peak RSS {unit} | ours tree PSS {unit} | llama-quantize PSS {unit}")


def main(argv: list[str] | None = None) -> int:
    from imatrix.quant.mixes import FILE_TYPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-quantize", metavar="PATH", help="llama-quantize, run beside ours")
    parser.add_argument("--work-dir", default="/tmp/imatrix-quant-speed",
                        help="where the big model, its imatrix and the outputs go (about 2 GB + 2 outputs)")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--width", type=int, default=4, help="times each SmolLM2 matrix is tiled per dimension")
    parser.add_argument("--layers", type=int, default=16, help="blocks of the big model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command; the fastest is reported")
    parser.add_argument("--no-imatrix", action="store_true", help="quantize without the imatrix")
    parser.add_argument("--no-compare", action="store_true", help="skip comparing the outputs tensor by tensor")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up rows")
    args = parser.parse_args(argv)
    if shutil.which(TIME) is None:
        raise SystemExit(f"{TIME} is needed (GNU time) for the peak resident set of each run")
    work = Path(args.work_dir)
    model, imatrix = prepare(work, args.width, args.layers)
    source = GGUFModelFile(model)
    n_params = sum(int(np.prod(info.ne)) for info in source.tensors.values())
    types = [name.strip() for name in args.types.split(",") if name.strip()]
    skipped = [name for name in types if name not in FILE_TYPES or not FILE_TYPES[name].kernels_ready]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
          f"input {model.name}: {n_params / 1e9:.2f}B parameters, {model.stat().st_size / GIB:.2f} GiB (F16)"
          + (f"; skipped (no kernels yet): {', '.join(skipped)}" if skipped else ""))
    if not args.no_startup:
        print("\n| start-up | " + HEADS.format(unit="MiB") + " |")
        print("|---" * 11 + "|")
        for row in startup_rows(model, imatrix, args.llama_quantize, args.threads, max(args.repeats, 3)):
            print(row, flush=True)
    print("\n| type | imatrix | " + HEADS.format(unit="GiB") + " | same tensors |")
    print("|---" * 13 + "|")
    for qtype in types:
        if qtype in skipped:
            continue
        row = type_row(qtype, model, None if args.no_imatrix else imatrix, work, args.llama_quantize, args.threads,
                       args.repeats, not args.no_compare)
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
