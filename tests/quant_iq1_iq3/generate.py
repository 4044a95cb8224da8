"""Regenerate the IQ3_XXS / IQ3_S / IQ1_S / IQ1_M goldens with llama-quantize.

    .venv/bin/python tests/quant_iq1_iq3/generate.py [--bin /work/llama/build/bin]

Blocks: `<TYPE>-im.gguf` / `<TYPE>-noim.gguf` hold llama-quantize's own blocks (`--pure`) for the first
`ROWS` rows of SmolLM2's 1536-column tensors in the shared `golden/quant/source-f16.gguf` (llama.cpp
quantizes rows independently; the 576-column tensors would fall back to IQ4_NL). llama-quantize requires an
imatrix for IQ3_XXS, IQ1_S and IQ1_M except for the token embedding and the output, so the `noim` sources
rename two tensors to those names (IQ3_S needs none; IQ1_S has no `noim` golden: its kernel asserts an imatrix).

Files: `files.json` holds the sha256 of whole files llama-quantize makes with its file-type mixes (IQ3_XS
and IQ3_M are mixes over IQ3_XXS / IQ3_S) from the synthetic llama of `quant_golden.py` and its imatrix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quant_golden import DENSE, write_smollm2_like, write_synthetic_imatrix, write_synthetic_llama  # noqa: E402

SHARED = Path("/work/shared/golden")
SOURCE = SHARED / "quant" / "source-f16.gguf"
IMATRIX = SHARED / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf"
ROWS = 96
# golden tensor name -> source tensor name
IM_SOURCES = {name: name for name in ("blk.0.ffn_down.weight", "blk.5.ffn_down.weight", "blk.29.ffn_down.weight")}
NOIM_SOURCES = {"token_embd.weight": "blk.5.ffn_down.weight", "output.weight": "blk.29.ffn_down.weight"}
# golden file stem -> with imatrix (the file type is the stem's type)
BLOCK_GOLDENS = {
    "IQ3_XXS-im": True, "IQ3_XXS-noim": False, "IQ3_S-im": True, "IQ3_S-noim": False,
    "IQ1_S-im": True, "IQ1_M-im": True, "IQ1_M-noim": False,
}
FILE_TYPES = ["IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M"]


def sources(with_imatrix: bool) -> dict[str, str]:
    return IM_SOURCES if with_imatrix else NOIM_SOURCES


def write_source(path: Path, names: dict[str, str]) -> None:
    """An F16 llama GGUF holding `ROWS` rows of each source tensor."""
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(SOURCE).tensors}
    write_smollm2_like(path, {name: tensors[source][:ROWS] for name, source in names.items()})


def file_inputs(folder: Path) -> tuple[Path, Path]:
    """The synthetic model and its imatrix the file goldens are made from."""
    model = write_synthetic_llama(folder / "dense.gguf", **DENSE)
    return model, write_synthetic_imatrix(model, folder / "im.gguf")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, default=Path("/work/llama/build/bin"))
    args = parser.parse_args()
    quantize = str(args.bin / "llama-quantize")
    with tempfile.TemporaryDirectory() as tmp:
        for stem, with_imatrix in BLOCK_GOLDENS.items():
            source = Path(tmp) / f"source-{stem}.gguf"
            write_source(source, sources(with_imatrix))
            command = [quantize, "--pure"] + (["--imatrix", str(IMATRIX)] if with_imatrix else [])
            command += [str(source), str(HERE / f"{stem}.gguf"), stem.split("-")[0], "2"]
            subprocess.run(command, check=True, capture_output=True)
            print(f"{stem}.gguf: {(HERE / f'{stem}.gguf').stat().st_size} bytes")
        model, imatrix = file_inputs(Path(tmp))
        files = {"inputs": {p.name: sha256(p) for p in (model, imatrix)}, "outputs": {}}
        for file_type in FILE_TYPES:
            # relative names: the imatrix's name is recorded in the file (quantize.imatrix.file)
            subprocess.run([quantize, "--imatrix", imatrix.name, model.name, "out.gguf", file_type, "2"],
                           cwd=tmp, check=True, capture_output=True)
            files["outputs"][file_type] = sha256(Path(tmp) / "out.gguf")
        (HERE / "files.json").write_text(json.dumps(files, indent=1) + "\n")


if __name__ == "__main__":
    main()
