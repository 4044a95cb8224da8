"""Quality of our quantizations of SmolLM2-135M, with and without the imatrix, beside llama.cpp's.

    python benchmarks/quant_quality.py --llama-perplexity PATH [--llama-quantize PATH] [--types Q2_K,IQ2_XXS]
        [--chunks 20] [--threads 2] [--work-dir DIR] [--imatrix FILE] [-o table.md]

Steps: the F16 model (from the bundled Q4_1, exactly llama-quantize's F16) and its base
log-probabilities on `eval.txt` (`-c 512 --chunks N`; the imatrix was collected on
`calibration.txt`, other text), written by llama-perplexity (`--kl-divergence-base`) or, without
`--llama-perplexity`, by our evaluator. Then for every type, with and without the golden
`smollm2-f16.c512.n40.imatrix.gguf` (or `--imatrix`) (types llama-quantize refuses to make without an imatrix only
with it): quantize with `imatrix quantize`, measure file size and bits per weight, then PPL, mean
KLD and same-top-token agreement against the F16 — by llama-perplexity where it loads the file,
else by `imatrix perplexity` (its drop-in, against the same base; the note says so).

llama.cpp's figures: with `--llama-quantize`, llama-quantize makes the same file here; when every
tensor is identical to ours (column "same tensors") its figures are ours, otherwise its file is measured
the same way. Without it, llama.cpp's figures come from the golden `quality.md` where it has the
type (measured with `--chunks 10`: only for runs with as many chunks). Files are kept in the work
directory: a second run quantizes only what is missing (and measures everything again).

With `--emulate-llama-cpu`, the runs of `imatrix perplexity` round the inputs of the matmuls as
llama.cpp's CPU backend rounds them, to compare with llama-perplexity's figures like for like.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMATRIX_SHARED", REPO.parent / "shared"))
QUALITY_MD = SHARED / "golden" / "quant" / "quality.md"
GOLDEN_IMATRIX = SHARED / "golden" / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf"
EVAL_TEXT = SHARED / "data" / "eval.txt"
# llama-quantize's types below 5 bits, lowest first, and our Q3_K_HIFI. Not by default: MXFP4_MOE (Q8_0 on
# a dense model) and Q2_0 (llama-perplexity has no fast CPU kernel for it: ~10 min a run here)
TYPES = ("IQ1_S", "IQ1_M", "Q1_0", "TQ1_0", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "TQ2_0", "Q2_K_S",
         "Q2_K", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "IQ4_NL", "Q4_K_M",
         "Q3_K_HIFI")
MIB = 1024 * 1024
GOLDEN_CHUNKS = 10  # the golden quality.md's llama-perplexity runs


@dataclass
class Measured:
    ppl: float | None = None
    kld: float | None = None
    top: float | None = None
    by: str = ""  # "llama.cpp" or "ours": whose evaluator measured it


@dataclass
class Row:
    qtype: str
    imatrix: bool
    mib: float | None = None
    bpw: float | None = None
    quantize_s: float | None = None
    ours: Measured | None = None
    theirs: Measured | None = None
    theirs_mib: float | None = None
    same: str = ""  # tensors identical to llama-quantize's, "n/total"
    note: str = ""


# --- llama.cpp's figures ---


def parse_quality(path: Path) -> dict[tuple[str, bool], dict[str, float]]:
    """llama.cpp's rows of the golden quality.md: (type, imatrix) -> {mib, quantize_s, ppl, kld, top}."""
    rows: dict[tuple[str, bool], dict[str, float]] = {}
    if not path.exists():
        return rows
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


OURS_PERPLEXITY = (sys.executable, "-m", "imatrix.cli.main", "perplexity")


def run_perplexity(command: Sequence[str], model: Path, base: Path, n_chunks: int, threads: int,
                   write_base: bool) -> str | None:
    """The output of `command` (llama-perplexity, or `imatrix perplexity`, its drop-in) on eval.txt, writing
    the base or measuring KLD against it; None if it could not load the model."""
    full = [*command, "-m", str(model), "-f", str(EVAL_TEXT), "-c", "512", "--chunks", str(n_chunks),
            "-t", str(threads), "--kl-divergence-base", str(base)]
    if not write_base:
        full.append("--kl-divergence")
    done = subprocess.run(full, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if any(sign in done.stderr for sign in ("failed to load model", "error loading model", "unable to load")):
            return None
        raise SystemExit(f"{' '.join(full)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def parse_kld_output(text: str, by: str) -> Measured:
    return Measured(_number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", text), _number(r"Mean\s+KLD:\s*([0-9.]+)", text),
                    _number(r"Same top p:\s*([0-9.]+)", text), by)


# --- files ---


def make_f16(work: Path) -> Path:
    from imatrix.models.bundled import smollm2_path
    from imatrix.models.f16 import write_f16_model

    f16 = work / "smollm2-135m-f16.gguf"
    if not f16.exists():
        log(f"writing {f16}")
        write_f16_model(smollm2_path(), f16)
    return f16


def bits_per_weight(path: Path) -> float | None:
    """llama.cpp's BPW: tensor data bits over weights. None where a tensor type is unknown to gguf-py."""
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


def quantize_ours(f16: Path, out: Path, qtype: str, imatrix: Path | None, threads: int) -> float | None:
    """`imatrix quantize` unless `out` exists; seconds taken, or None if it was there."""
    if out.exists():
        return None
    from imatrix.quant.model import quantize_model

    start = time.perf_counter()
    quantize_model(f16, out, qtype, imatrix=imatrix, n_threads=threads)
    return time.perf_counter() - start


def quantize_theirs(binary: str, f16: Path, out: Path, qtype: str, imatrix: Path | None, threads: int) -> None:
    if out.exists():
        return
    extra = ["--imatrix", str(imatrix)] if imatrix else []
    done = subprocess.run([binary, *extra, str(f16), str(out), qtype, str(threads)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama-quantize {qtype} failed:\n{done.stderr[-3000:]}")


def same_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
    """(tensors of the two files with the same type and bytes, tensors in llama.cpp's file)."""
    import numpy as np

    a, b = GGUFModelFile(ours), GGUFModelFile(theirs)
    same = sum(name in b.tensors and a.tensors[name].tensor_type == b.tensors[name].tensor_type
               and np.array_equal(a.raw(name), b.raw(name)) for name in a.tensors)
    return same, len(b.tensors)


# --- measuring ---


class Evaluator:
    """Measures a file by llama-perplexity where it loads it, else by `imatrix perplexity`, against one F16 base
    (llama-perplexity's when it is given)."""

    def __init__(self, work: Path, f16: Path, n_chunks: int, threads: int, llama_perplexity: str | None,
                 emulate: bool) -> None:
        self.work, self.f16, self.n_chunks, self.threads = work, f16, n_chunks, threads
        self.llama = [llama_perplexity] if llama_perplexity else None
        self.ours = [*OURS_PERPLEXITY, *(["--emulate-llama-cpu"] if emulate else [])]
        by = "llama" if llama_perplexity else "ours-cpu" if emulate else "ours"
        self.base = work / f"f16.c512.n{n_chunks}.{by}.kld"
        text = run_perplexity(self.llama or self.ours, f16, self.base, n_chunks, threads, write_base=True)
        assert text is not None, "the evaluator cannot load the F16 model"
        self.f16_ppl = _number(r"Final estimate: PPL = ([0-9.]+)", text)

    def measure(self, path: Path) -> Measured:
        if self.llama:
            text = run_perplexity(self.llama, path, self.base, self.n_chunks, self.threads, write_base=False)
            if text is not None:
                return parse_kld_output(text, "llama.cpp")
        text = run_perplexity(self.ours, path, self.base, self.n_chunks, self.threads, write_base=False)
        if text is None:
            raise SystemExit(f"imatrix perplexity cannot load {path}")
        return parse_kld_output(text, "ours")


def measure_type(evaluator: Evaluator, qtype: str, imatrix: Path | None, llama_quantize: str | None,
                 golden: dict[tuple[str, bool], dict[str, float]]) -> Row:
    with_imatrix = imatrix is not None
    row = Row(qtype, with_imatrix)
    work, tag = evaluator.work, "im" if with_imatrix else "noim"
    out = work / f"smollm2-{qtype}-{tag}.gguf"
    try:
        row.quantize_s = quantize_ours(evaluator.f16, out, qtype, imatrix, evaluator.threads)
    except ImatrixError as exc:
        row.note = "refused without imatrix (as llama-quantize)" if "requires an imatrix" in str(exc) else \
            f"not made: {str(exc)[:110]}"
        return row
    row.mib, row.bpw = out.stat().st_size / MIB, bits_per_weight(out)
    row.ours = evaluator.measure(out)
    if llama_quantize and qtype != "Q3_K_HIFI":
        theirs = work / f"llama-{qtype}-{tag}.gguf"
        quantize_theirs(llama_quantize, evaluator.f16, theirs, qtype, imatrix, evaluator.threads)
        same, total = same_tensors(out, theirs)
        row.same, row.theirs_mib = f"{same}/{total}", theirs.stat().st_size / MIB
        row.theirs = row.ours if same == total else evaluator.measure(theirs)
    elif (qtype, with_imatrix) in golden:
        ref = golden[(qtype, with_imatrix)]
        row.theirs, row.theirs_mib = Measured(ref["ppl"], ref["kld"], ref["top"], "golden"), ref["mib"]
    if row.ours.by == "ours" and evaluator.llama:
        row.note = "measured by `imatrix perplexity` (llama.cpp cannot load the file)"
    return row


# --- the table ---


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row], f16_ppl: float | None, evaluator_name: str) -> str:
    lines = [f"F16 PPL ({evaluator_name}): {_fmt(f16_ppl, 4)}", "",
             "| type | imatrix | file MiB | bits/weight | PPL | mean KLD | same top % | llama.cpp MiB "
             "| llama.cpp PPL | llama.cpp KLD | llama.cpp top % | same tensors | note |",
             "|---" * 13 + "|"]
    for row in rows:
        ours, theirs = row.ours or Measured(), row.theirs or Measured()
        lines.append(
            f"| {row.qtype} | {'yes' if row.imatrix else 'no'} | {_fmt(row.mib, 1)} | {_fmt(row.bpw, 2)} "
            f"| {_fmt(ours.ppl, 4)} | {_fmt(ours.kld, 6)} | {_fmt(ours.top, 3)} | {_fmt(row.theirs_mib, 1)} "
            f"| {_fmt(theirs.ppl, 4)} | {_fmt(theirs.kld, 6)} | {_fmt(theirs.top, 3)} | {row.same or '–'} "
            f"| {row.note} |")
    return "\n".join(lines) + "\n"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated (default: {','.join(TYPES)})")
    parser.add_argument("--chunks", type=int, default=20, help="chunks of 512 tokens (default: 20)")
    parser.add_argument("--work-dir", default="/tmp/imatrix-quant-quality", help="models and base logits live here")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--llama-perplexity", metavar="PATH", help="measure with llama.cpp's llama-perplexity")
    parser.add_argument("--llama-quantize", metavar="PATH", help="make llama.cpp's files here to compare with")
    parser.add_argument("--imatrix", type=Path, default=GOLDEN_IMATRIX,
                        help="the imatrix of the runs with one (default: the golden, llama-imatrix's on the F16; "
                             "give each imatrix its own --work-dir)")
    parser.add_argument("--no-imatrix-runs", action="store_true", help="only the runs with the imatrix")
    parser.add_argument("-o", "--output", help="also write the table (markdown) here")
    parser.add_argument("--emulate-llama-cpu", action="store_true",
                        help="measure with our evaluator, llama.cpp's CPU matmul inputs emulated")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    f16 = make_f16(work)
    evaluator = Evaluator(work, f16, args.chunks, args.threads, args.llama_perplexity, args.emulate_llama_cpu)
    golden = parse_quality(QUALITY_MD) if args.chunks == GOLDEN_CHUNKS and args.imatrix == GOLDEN_IMATRIX else {}
    rows, text = [], ""
    for qtype in [name.strip() for name in args.types.split(",") if name.strip()]:
        for with_imatrix in (True,) if args.no_imatrix_runs else (False, True):
            log(f"--- {qtype} {'with' if with_imatrix else 'without'} imatrix")
            imatrix = args.imatrix if with_imatrix else None
            rows.append(measure_type(evaluator, qtype, imatrix, args.llama_quantize, golden))
            log(str(rows[-1]))
            text = table(rows, evaluator.f16_ppl, "llama-perplexity" if args.llama_perplexity else "imatrix perplexity")
            if args.output:  # the table so far, after every row
                Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
