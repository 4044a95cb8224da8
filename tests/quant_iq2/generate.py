"""Regenerate the IQ2 goldens: llama-quantize's own blocks for a few rows of SmolLM2's 1536-column tensors.

    .venv/bin/python tests/quant_iq2/generate.py [--bin /work/llama/build/bin]

Source rows: the first `ROWS` rows of tensors of the shared `golden/quant/source-f16.gguf` (llama.cpp
quantizes rows independently, so the tests quantize the same rows of the shared file). The 576-column
tensors are left out: they fall back to IQ4_NL. `llama-quantize --pure` makes every tensor the file
type's default type: IQ2_XXS and IQ2_XS from those file types, IQ2_S from IQ2_M (the IQ2_S file type
defaults to IQ2_XS). Without an imatrix llama-quantize refuses these types except for the token
embedding and the output, so the IQ2_S `noim` golden renames two tensors to those names; IQ2_XXS and
IQ2_XS have no `noim` golden: llama.cpp asserts in their kernels without an imatrix.

`mixes.json`: the sha256 of the files llama-quantize makes of `tests/quant_golden.py`'s synthetic llama
model (`DENSE`, every row a multiple of 256) with its synthetic imatrix, in each IQ2 file type (its own
mix: IQ3_S, Q2_K, Q4_K, Q5_K tensors beside the IQ2 ones).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quant_golden import DENSE, write_smollm2_like, write_synthetic_imatrix, write_synthetic_llama  # noqa: E402

GOLDEN = Path(os.environ.get("IMATRIX_SHARED", HERE.parent.parent.parent / "shared")) / "golden"
SOURCE = "quant/source-f16.gguf"  # in GOLDEN
IMATRIX = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
ROWS = 128
# golden tensor name -> source tensor name
IM_SOURCES = {name: name for name in ("blk.0.ffn_down.weight", "blk.5.ffn_down.weight", "blk.29.ffn_down.weight")}
NOIM_SOURCES = {"token_embd.weight": "blk.5.ffn_down.weight", "output.weight": "blk.29.ffn_down.weight"}
MIX_FILE_TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"]
# golden file stem -> (llama-quantize file type, with imatrix)
GOLDENS = {
    "IQ2_XXS-im": ("IQ2_XXS", True),
    "IQ2_XS-im": ("IQ2_XS", True),
    "IQ2_S-im": ("IQ2_M", True),
    "IQ2_S-noim": ("IQ2_M", False),
}


def sources(with_imatrix: bool) -> dict[str, str]:
    return IM_SOURCES if with_imatrix else NOIM_SOURCES


def write_source(path: Path, names: dict[str, str]) -> None:
    """An F16 llama GGUF holding `ROWS` rows of each source tensor."""
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(GOLDEN / SOURCE).tensors}
    write_smollm2_like(path, {name: tensors[source][:ROWS] for name, source in names.items()})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mix_inputs(folder: Path) -> dict[str, str]:
    """The synthetic model and imatrix of the mix test, written into `folder`; their sha256 by name."""
    write_synthetic_llama(folder / "dense.gguf", **DENSE)
    write_synthetic_imatrix(folder / "dense.gguf", folder / "im.gguf")
    return {name: sha256(folder / name) for name in ("dense.gguf", "im.gguf")}


def mix_args(file_type: str) -> list[str]:
    return ["--imatrix", "im.gguf", "dense.gguf", f"{file_type}.gguf", file_type, "2"]


def write_blocks(binary: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for stem, (file_type, with_imatrix) in GOLDENS.items():
            source = Path(tmp) / f"source-{stem}.gguf"
            write_source(source, sources(with_imatrix))
            command = [str(binary), "--pure"]
            if with_imatrix:
                command += ["--imatrix", str(GOLDEN / IMATRIX)]
            command += [str(source), str(HERE / f"{stem}.gguf"), file_type, "2"]
            subprocess.run(command, check=True, capture_output=True)
            print(f"{stem}.gguf: {(HERE / f'{stem}.gguf').stat().st_size} bytes")


def write_mixes(binary: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        golden: dict[str, dict[str, str]] = {"inputs": mix_inputs(work), "outputs": {}}
        for file_type in MIX_FILE_TYPES:
            subprocess.run([str(binary), *mix_args(file_type)], cwd=work, check=True, capture_output=True)
            golden["outputs"][file_type] = sha256(work / f"{file_type}.gguf")
    (HERE / "mixes.json").write_text(json.dumps(golden, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, default=Path("/work/llama/build/bin"))
    args = parser.parse_args()
    binary = args.bin / "llama-quantize"
    write_blocks(binary)
    write_mixes(binary)


if __name__ == "__main__":
    main()
