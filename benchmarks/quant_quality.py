"""Quality of our quantizations of SmolLM2-135M, with and without the imatrix, beside llama.cpp's.

    python benchmarks/quant_quality.py [--types Q2_K,Q4_K_M] [--chunks 10] [--work-dir DIR] [-o table.md]

Steps: the F16 model (from the bundled Q4_1, exactly llama-quantize's F16), its base
log-probabilities on `eval.txt` (`-c 512 --chunks 10`), then for every type with and without
`smollm2-f16.c512.n40.imatrix.gguf`: quantize, measure file size and bits per weight, then PPL,
mean KLD and same-top-token agreement against the F16. llama.cpp's figures come from the golden
`quality.md`. Files are kept in the work directory, so a second run only re-measures.

With `--emulate-llama-cpu` every model (the F16 base included) is measured a second time with the
inputs of its matmuls rounded as llama.cpp's CPU backend rounds them (`imatrix.eval.cpu_matmul`), so
that these columns compare with llama-perplexity's figures like for like.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imatrix.errors import ImatrixError
from imatrix.eval.cpu_matmul import emulate_cpu_matmul_inputs
from imatrix.eval.kld import kl_divergence
from imatrix.eval.perplexity import perplexity, stderr_log
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.matrix import ImportanceMatrix
from imatrix.models.bundled import smollm2_path
from imatrix.models.loader import load_model

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMATRIX_SHARED", REPO.parent / "shared"))
QUALITY_MD = SHARED / "golden" / "quant" / "quality.md"
IMATRIX = SHARED / "golden" / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf"
EVAL_TEXT = SHARED / "data" / "eval.txt"
TYPES = ("Q2_K", "Q3_K_S", "Q4_K_M", "IQ4_XS", "Q3_K_HIFI")
MIB = 1024 * 1024


@dataclass
class Row:
    qtype: str
    imatrix: bool
    mib: float | None = None
    bpw: float | None = None
    quantize_s: float | None = None
    ppl: float | None = None
    kld: float | None = None
    top: float | None = None
    cpu_ppl: float | None = None  # measured with llama.cpp's CPU matmul inputs emulated
    cpu_kld: float | None = None
    cpu_top: float | None = None
    note: str = ""


def parse_quality(path: Path) -> dict[tuple[str, bool], dict[str, float]]:
    """llama.cpp's rows of quality.md: (type, imatrix) -> {mib, quantize_s, ppl, kld, top}."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[1] not in ("yes", "no"):
            continue
        try:
            values = [float(cell) for cell in cells[2:]]
        except ValueError:
            continue
        rows[(cells[0], cells[1] == "yes")] = dict(zip(("mib", "quantize_s", "ppl", "kld", "top"), values,
                                                       strict=True))
    return rows


def parse_f16_ppl(path: Path) -> float | None:
    match = re.search(r"F16: PPL = ([0-9.]+)", path.read_text())
    return float(match.group(1)) if match else None


def bits_per_weight(path: Path) -> float | None:
    """llama.cpp's BPW: tensor data bits over weights. None where gguf-py does not know a tensor type."""
    try:
        model_file = GGUFModelFile(path)
    except ImatrixError:
        return None
    infos = model_file.tensors.values()
    n_weights = sum(_n_elements(info.ne) for info in infos)
    return 8 * sum(info.n_bytes for info in infos) / n_weights


def _n_elements(ne: tuple[int, ...]) -> int:
    count = 1
    for size in ne:
        count *= size
    return count


def make_f16(work: Path) -> Path:
    from imatrix.models.f16 import write_f16_model

    f16 = work / "smollm2-135m-f16.gguf"
    if not f16.exists():
        stderr_log(f"writing {f16}")
        write_f16_model(smollm2_path(), f16)
    return f16


def make_base(work: Path, n_chunks: int, f16: Path, emulate: bool = False) -> tuple[Path, float]:
    """F16 base log-probabilities (with `emulate`: with llama.cpp's CPU matmul inputs) and its PPL."""
    base = work / f"f16.c512.n{n_chunks}{'.cpu' if emulate else ''}.kld"
    loaded = load_model(f16)
    if emulate:
        emulate_cpu_matmul_inputs(loaded)
    result = perplexity(loaded, EVAL_TEXT, n_ctx=512, max_chunks=n_chunks,
                        save_base=None if base.exists() else base, log=stderr_log)
    stderr_log(f"F16{' (CPU emulation)' if emulate else ''}: {result.final_line()}")
    return base, result.ppl


def quantize(f16: Path, out: Path, qtype: str, with_imatrix: bool) -> float | None:
    """Quantize unless `out` exists; seconds taken, or None if it was there."""
    if out.exists():
        return None
    from imatrix.quant.model import quantize_model

    imatrix = ImportanceMatrix.load(IMATRIX) if with_imatrix else None
    start = time.perf_counter()
    quantize_model(f16, out, qtype, imatrix=imatrix)
    return time.perf_counter() - start


def measure(f16: Path, base: Path, work: Path, qtype: str, with_imatrix: bool, cpu_base: Path | None) -> Row:
    row = Row(qtype, with_imatrix)
    out = work / f"smollm2-{qtype}-{'im' if with_imatrix else 'noim'}.gguf"
    try:
        row.quantize_s = quantize(f16, out, qtype, with_imatrix)
    except (ImatrixError, NotImplementedError, KeyError, ValueError) as exc:
        row.note = f"quantize failed: {str(exc)[:60]}"
        return row
    row.mib, row.bpw = out.stat().st_size / MIB, bits_per_weight(out)
    try:
        loaded = load_model(out)
    except ImatrixError as exc:
        row.note = f"not loadable: {str(exc)[:60]}"
        return row
    result = kl_divergence(loaded, base, log=stderr_log)
    row.ppl, row.kld, row.top = result.ppl, result.mean_kld, result.same_top_percent
    if cpu_base is not None:
        emulate_cpu_matmul_inputs(loaded)
        result = kl_divergence(loaded, cpu_base, log=stderr_log)
        row.cpu_ppl, row.cpu_kld, row.cpu_top = result.ppl, result.mean_kld, result.same_top_percent
    return row


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row], theirs: dict[tuple[str, bool], dict[str, float]], f16_ppl: float,
          f16_ppl_theirs: float | None, f16_cpu_ppl: float | None = None) -> str:
    emulated = f16_cpu_ppl is not None
    f16_line = f"F16: PPL ours {f16_ppl:.4f}, llama.cpp {_fmt(f16_ppl_theirs, 4)}"
    if emulated:
        f16_line += f"; ours with llama.cpp's CPU matmul inputs {f16_cpu_ppl:.4f}"
    header = "| type | imatrix | file MiB | bits/weight | quantize s | PPL | mean KLD | same top % "
    if emulated:
        header += "| CPU-emulated PPL | CPU-emulated KLD | CPU-emulated top % "
    header += "| llama.cpp MiB | llama.cpp PPL | llama.cpp KLD | llama.cpp top % | note |"
    lines = [f16_line, "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        ref = theirs.get((row.qtype, row.imatrix), {})
        cells = (f"| {row.qtype} | {'yes' if row.imatrix else 'no'} | {_fmt(row.mib, 1)} | {_fmt(row.bpw, 2)} "
                 f"| {_fmt(row.quantize_s, 1)} | {_fmt(row.ppl, 4)} | {_fmt(row.kld, 6)} | {_fmt(row.top, 3)} ")
        if emulated:
            cells += f"| {_fmt(row.cpu_ppl, 4)} | {_fmt(row.cpu_kld, 6)} | {_fmt(row.cpu_top, 3)} "
        cells += (f"| {_fmt(ref.get('mib'), 1)} | {_fmt(ref.get('ppl'), 4)} | {_fmt(ref.get('kld'), 6)} "
                  f"| {_fmt(ref.get('top'), 3)} | {row.note} |")
        lines.append(cells)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated (default: {','.join(TYPES)})")
    parser.add_argument("--chunks", type=int, default=10, help="chunks of 512 tokens (default: 10)")
    parser.add_argument("--work-dir", default="/tmp/imatrix-quant-quality", help="models and base logits live here")
    parser.add_argument("-t", "--threads", type=int, default=0)
    parser.add_argument("-o", "--output", help="also write the table (markdown) here")
    parser.add_argument("--emulate-llama-cpu", action="store_true",
                        help="also measure with llama.cpp's CPU matmul inputs emulated (doubles the time)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    f16 = make_f16(work)
    base, f16_ppl = make_base(work, args.chunks, f16)
    cpu_base, f16_cpu_ppl = make_base(work, args.chunks, f16, emulate=True) if args.emulate_llama_cpu else (None, None)
    rows = []
    for qtype in [name.strip() for name in args.types.split(",") if name.strip()]:
        for with_imatrix in (False, True):
            stderr_log(f"--- {qtype} {'with' if with_imatrix else 'without'} imatrix")
            rows.append(measure(f16, base, work, qtype, with_imatrix, cpu_base))
            stderr_log(str(rows[-1]))
    text = table(rows, parse_quality(QUALITY_MD), f16_ppl, parse_f16_ppl(QUALITY_MD), f16_cpu_ppl)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
