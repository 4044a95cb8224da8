"""IQ2_XXS, IQ2_XS and IQ2_S against llama-quantize's own bytes (blocks and whole IQ2 files), the
neighbour lists, the refusals without an imatrix, and reconstruction sanity."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imatrix import ImatrixError
from imatrix.cli.main import main
from imatrix.formats import load_imatrix
from imatrix.quant.base import quantize_rows
from imatrix.quant.iq2 import GROUP, MAX_LEVEL, codes_of, lattice
from quant_golden import gaussian_relative_rms, identical_blocks, random_imatrix, random_rows, round_trip_blocks
from quant_iq2.generate import GOLDENS, IMATRIX, MIX_FILE_TYPES, ROWS, SOURCE, mix_args, mix_inputs, sources

Q = gguf.GGMLQuantizationType
HERE = Path(__file__).resolve().parent / "quant_iq2"
IQ2_TYPES = [Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S]


@pytest.mark.parametrize("stem", sorted(GOLDENS))
def test_blocks_match_llama_quantize(golden: Path, stem: str) -> None:
    with_imatrix = GOLDENS[stem][1]
    source = {t.name: np.asarray(t.data).astype(np.float32) for t in gguf.GGUFReader(golden / SOURCE).tensors}
    matrix = load_imatrix(golden / IMATRIX) if with_imatrix else None
    identical, total = identical_blocks(HERE / f"{stem}.gguf", source, sources(with_imatrix), ROWS, matrix)
    assert total >= 1536
    # measured: every block identical in all four files (and in 9,600 blocks per type of full-size and
    # synthetic tensors: heavy tails, sparse, tiny, constant, zero imatrix columns)
    assert identical / total >= 0.999, f"{identical} of {total} blocks identical"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("file_type", MIX_FILE_TYPES)
def test_file_types_match_llama_quantize(file_type: str, tmp_path: Path) -> None:
    """The whole file, llama-quantize's mix for the type included (IQ3_S, Q2_K, Q4_K, Q5_K beside IQ2)."""
    expected = json.loads((HERE / "mixes.json").read_text())
    assert mix_inputs(tmp_path) == expected["inputs"], "the inputs changed: rerun tests/quant_iq2/generate.py"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["quantize", *mix_args(file_type)]) == 0
    finally:
        os.chdir(cwd)
    assert sha256(tmp_path / f"{file_type}.gguf") == expected["outputs"][file_type]


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.IQ2_XS])
def test_refuses_without_imatrix(qtype: Q) -> None:
    """llama.cpp asserts in ggml_quantize_chunk (e.g. `--pure` reaching token_embd, which has no imatrix row)."""
    with pytest.raises(ImatrixError, match="without an importance matrix"):
        quantize_rows(np.ones((1, 256), np.float32), qtype)


@pytest.mark.parametrize("qtype", IQ2_TYPES)
def test_neighbour_lists(qtype: Q) -> None:
    """Each code off the grid lists the grid points at its 2 (IQ2_S: 1) smallest distances, nearest first."""
    lat = lattice(qtype)
    n_distances = 1 if qtype == Q.IQ2_S else 2
    rng = np.random.default_rng(0)
    codes = codes_of(rng.integers(0, MAX_LEVEL + 1, (300, GROUP)))
    for code in codes[lat.index_of[codes] < 0]:
        levels = (code >> (2 * np.arange(GROUP))) & 3
        dist = ((lat.levels - levels) ** 2).sum(axis=1)
        listed = lat.neighbours[lat.first[code] : lat.first[code] + lat.count[code]]
        wanted = np.flatnonzero(dist <= np.unique(dist)[n_distances - 1])
        np.testing.assert_array_equal(listed, wanted[np.argsort(dist[wanted], kind="stable")])
    assert (lat.count[lat.index_of >= 0] == 0).all()


@pytest.mark.parametrize(("qtype", "with_imatrix", "bound"), [
    (Q.IQ2_XXS, True, 0.38), (Q.IQ2_XS, True, 0.33), (Q.IQ2_S, True, 0.28), (Q.IQ2_S, False, 0.29),
])
def test_round_trip_gaussian(qtype: Q, with_imatrix: bool, bound: float) -> None:
    """Relative RMS error on Gaussian rows with equal weights (measured 0.344, 0.301, 0.249, 0.265)."""
    assert gaussian_relative_rms(qtype, with_imatrix) < bound


@pytest.mark.parametrize("qtype", IQ2_TYPES)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["normal", "zeros", "constant", "sparse", "mixed"]),
    log_scale=st.floats(-12, 4),
)
def test_reconstruction_invariants(qtype: Q, seed: int, kind: str, log_scale: float) -> None:
    x = random_rows(seed, 2, 512, kind, log_scale)
    recon, blocks = round_trip_blocks(x, qtype, random_imatrix(seed, 512))
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    assert np.isfinite(recon).all()
    assert (recon[amax[:, 0] == 0] == 0).all()
    # a grid point may force a value up to the top level, and a sign flip may negate it
    assert (np.abs(recon - blocks) <= 2.5 * amax + 2.0**-14).all()
