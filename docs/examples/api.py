"""The public API in one script: each `imatrix` sub-command as the function it calls.

    python docs/examples/api.py MODEL-F16.gguf CALIBRATION.txt [WORK_DIR]

Every function takes the options of its command (field names are the long flags: `-c` is `ctx_size`,
`--chunks` is `chunks`) and a `Reporter` for what it has to say; without one it is silent and returns its
result. tests/test_api.py runs this script on a tiny model.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import imatrix
from imatrix import CollectOptions, ConvertOptions, MergeOptions, PerplexityOptions, QuantizeOptions, Reporter


def main(model: Path, text: Path, work: Path) -> None:
    # where the messages go: results (the `[1]12.3456,` lines) to stdout, the rest to stderr, as -lv 2 lets them
    console = Reporter(verbosity=2, output=lambda result: print(result, end=""),
                       messages=lambda line: print(line, file=sys.stderr))

    # imatrix -m MODEL -f TEXT -c 128 --chunks 4 -o first.gguf
    first = imatrix.collect(CollectOptions(model=model, file=text, ctx_size=128, chunks=4,
                                           output_file=work / "first.gguf"), console)
    stats = first.matrix["blk.0.attn_q.weight"]
    print(f"attn_q: {stats.n_cols} columns, {stats.counts[0]} token rows, PPL {first.ppl.final()[0]:.2f}")

    # the next four chunks, then both summed: imatrix --in-file first.gguf --in-file second.gguf -c 128 -o merged.gguf
    # (-c: the chunk size the merge counts its chunks in)
    imatrix.collect(CollectOptions(model=model, file=text, ctx_size=128, from_chunk=4, chunks=4,
                                   output_file=work / "second.gguf"))
    merged = imatrix.merge(MergeOptions(in_file=[work / "first.gguf", work / "second.gguf"], ctx_size=128,
                                        output_file=work / "merged.gguf"))
    print(f"merged: {merged.chunk_count} chunks of {merged.chunk_size} tokens")

    # imatrix --in-file merged.gguf --output-format dat -o merged.dat; and reading, writing files directly
    imatrix.convert(ConvertOptions(in_file=work / "merged.gguf", output_file=work / "merged.dat", output_format="dat"))
    legacy = imatrix.load(work / "merged.dat", chunk_size=128)
    imatrix.save(legacy, work / "from-dat.gguf")

    # imatrix quantize --imatrix merged.gguf MODEL q4_k_m.gguf Q4_K_M
    report = imatrix.quantize(model, work / "q4_k_m.gguf", "Q4_K_M", QuantizeOptions(imatrix=str(work / "merged.gguf")))
    print(f"quantized {len(report.tensors)} tensors to {report.output_path.name}")

    # imatrix perplexity -m MODEL -f TEXT -c 128 --chunks 4 --kl-divergence-base base.kld: PPL, and the base
    # log-probabilities; then the quantized model's KL divergence from them (--kl-divergence)
    base = imatrix.perplexity(PerplexityOptions(model=model, file=text, ctx_size=128, chunks=4,
                                                kl_divergence_base=work / "base.kld"))
    quantized = imatrix.perplexity(PerplexityOptions(model=work / "q4_k_m.gguf", kl_divergence_base=work / "base.kld",
                                                     kl_divergence=True))
    print(f"PPL {base.ppl:.2f} -> {quantized.ppl:.2f}, mean KLD {quantized.mean_kld:.5f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    work_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(tempfile.mkdtemp(prefix="imatrix-api-"))
    main(Path(sys.argv[1]), Path(sys.argv[2]), work_dir)
