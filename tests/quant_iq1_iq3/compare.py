"""Our kernels against the goldens of `generate.py` (shared by tests/test_quant_iq3.py and test_quant_iq1.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np

from imatrix.cli.main import main
from imatrix.formats import load_imatrix
from quant_golden import identical_blocks
from quant_iq1_iq3.generate import BLOCK_GOLDENS, IMATRIX, ROWS, SOURCE, file_inputs, sources

HERE = Path(__file__).resolve().parent


def compare_blocks(golden: Path, stem: str) -> tuple[int, int]:
    """(identical, total) blocks of golden `stem` against ours on the same rows (`golden`: the shared folder)."""
    with_imatrix = BLOCK_GOLDENS[stem]
    source_file = golden / "quant" / SOURCE.name
    source = {t.name: np.asarray(t.data).astype(np.float32) for t in gguf.GGUFReader(source_file).tensors}
    matrix = load_imatrix(golden / "imatrix" / IMATRIX.name) if with_imatrix else None
    return identical_blocks(HERE / f"{stem}.gguf", source, sources(with_imatrix), ROWS, matrix)


def file_matches(file_type: str, folder: Path) -> bool:
    """Whether `imatrix quantize` makes llama-quantize's file of `file_type` from the synthetic model."""
    expected = json.loads((HERE / "files.json").read_text())
    inputs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in file_inputs(folder)}
    assert inputs == expected["inputs"], "the inputs changed: rerun tests/quant_iq1_iq3/generate.py"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["quantize", "--imatrix", "im.gguf", "dense.gguf", "out.gguf", file_type, "1"]) == 0
    finally:
        os.chdir(cwd)
    return hashlib.sha256((folder / "out.gguf").read_bytes()).hexdigest() == expected["outputs"][file_type]
