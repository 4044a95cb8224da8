"""TQ1_0, TQ2_0, MXFP4, Q1_0, Q2_0 (and Q2_K's search order) against llama.cpp's own bytes (tests/quant_lowbit).

None of these five kernels reads the imatrix; llama-quantize's files with and without one hold the same
blocks (golden.json records both), so each type is compared once per mode against one stored file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings

import imatrix.quant  # noqa: F401  (registers the types)
from imatrix.cli.main import main
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.ggufio.types import dequantize, type_sizes
from imatrix.quant.base import ggml_type, quant_type, quantize_rows
from imatrix.quant.mxfp4 import MAGNITUDES, half_scale, level_indices, shared_exponent
from quant_golden import block_cases, imatrix_rows, random_imatrix, random_rows

HERE = Path(__file__).parent / "quant_lowbit"
GOLDEN = json.loads((HERE / "golden.json").read_text())
TYPES = ["TQ1_0", "TQ2_0", "MXFP4", "Q1_0", "Q2_0"]
T = gguf.GGMLQuantizationType


def source() -> GGUFModelFile:
    return GGUFModelFile(HERE / "source-f16.gguf")


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["noim", "im"])
@pytest.mark.parametrize("type_name", TYPES)
def test_matches_llama_quantize(golden: Path, type_name: str, with_imatrix: bool) -> None:
    hashes = GOLDEN["tensors"][type_name]
    assert hashes["im"] == hashes["noim"], "llama-quantize's blocks changed with the imatrix"
    theirs_file, src = GGUFModelFile(HERE / f"{type_name}.gguf"), source()
    identical = total = 0
    for name, info in theirs_file.tensors.items():
        assert info.tensor_type == ggml_type(type_name)
        x = src.raw(name).view(np.float16).astype(np.float32)
        qw = imatrix_rows(golden)[name] if with_imatrix else None
        type_size = type_sizes(info.tensor_type)[1]
        same = (
            quantize_rows(x, info.tensor_type, qw).reshape(-1, type_size)
            == theirs_file.raw(name).reshape(-1, type_size)
        ).all(axis=1)
        identical, total = identical + int(same.sum()), total + same.size
    # measured: 100% identical for all five (792 / 792 / 8496 / 1584 / 4248 blocks)
    assert identical == total, f"{100 * identical / total:.4f}% identical"


EDGE = np.load(HERE / "edge-f32.npz")
EDGE_CASES = sorted({key.split("/")[0] for key in EDGE.files})


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_float32_edge_cases_match_ggml(type_name: str, case: str) -> None:
    """Subnormals, wide exponents, maxima just below a power of two: ggml's reference kernel's bytes,
    including C's implementation-defined conversions the module docstrings describe."""
    qtype = ggml_type(type_name)
    block_size, type_size = type_sizes(qtype)
    x = EDGE[f"{case}/input"]
    with np.errstate(all="ignore"):
        ours = quantize_rows(x.reshape(-1, 8 * block_size), qtype).reshape(-1, type_size)
    np.testing.assert_array_equal(ours, EDGE[f"{case}/{type_name}"].reshape(-1, type_size))
    if f"{case}/{type_name}/dequantized" in EDGE.files:
        back = dequantize(EDGE[f"{case}/{type_name}"].reshape(1, -1), qtype).reshape(-1)
        np.testing.assert_array_equal(back, EDGE[f"{case}/{type_name}/dequantized"])


def test_q2_k_blocks_where_the_error_order_matters() -> None:
    """make_qkx3_quants weighs each squared error as `w * (diff * diff)`; `(w * diff) * diff` changes these."""
    stored = np.load(HERE / "q2_k-blocks.npz")
    for x, weights, expected, where in zip(
        stored["x"], stored["weights"], stored["blocks"], stored["where"], strict=True
    ):
        ours = quantize_rows(x[None].astype(np.float32), T.Q2_K, weights)[0]
        np.testing.assert_array_equal(ours, expected, err_msg=str(where))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quant_lowbit.generate import build_models

    folder = tmp_path_factory.mktemp("lowbit-models")
    build_models(folder)
    expected = next(iter(GOLDEN["files"].values()))["inputs"]
    changed = sorted(name for name, digest in expected.items() if sha256(folder / name) != digest)
    assert not changed, f"the synthetic inputs changed ({changed}): rerun tests/quant_lowbit/generate.py"
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", sorted(GOLDEN["files"]))
def test_whole_files_match_llama_quantize(case: str, models: Path, tmp_path: Path) -> None:
    """The file types' mixes end to end (MXFP4_MOE: MXFP4 experts, Q8_0 elsewhere), byte for byte."""
    for path in models.iterdir():
        (tmp_path / path.name).symlink_to(path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["quantize", *GOLDEN["files"][case]["args"]]) == 0
    finally:
        os.chdir(cwd)
    assert sha256(tmp_path / "out.gguf") == GOLDEN["files"][case]["sha256"]


# ----------------------------------------------------------------------------- invariants


def reconstruct(type_name: str, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    qtype = ggml_type(type_name)
    block_size, type_size = type_sizes(qtype)
    out = quantize_rows(x, qtype, qw)
    assert out.dtype == np.uint8 and out.shape == (x.shape[0], x.shape[1] // block_size * type_size)
    # gguf-py's dequantizer where it has one (TQ1_0, TQ2_0, MXFP4), the classes' own for Q1_0 / Q2_0
    return dequantize(out, qtype).reshape(x.shape)


@pytest.mark.parametrize("type_name", TYPES)
@settings(max_examples=30, deadline=None)
@given(**block_cases(3, 2))
def test_reconstruction(
    type_name: str, seed: int, n_rows: int, n_blocks: int, kind: str, log_scale: float, with_imatrix: bool
) -> None:
    """Zeros stay zero; every value lies within half its block's max of the original (ternary, Q2_0 and
    MXFP4: the nearest level, levels at most max/2 apart); Q1_0 keeps each sign at the block's mean |x|."""
    block_size = type_sizes(ggml_type(type_name))[0]
    x = random_rows(seed, n_rows, block_size * n_blocks, kind, log_scale)
    qw = random_imatrix(seed, x.shape[1]) if with_imatrix else None
    recon = reconstruct(type_name, x, qw).reshape(-1, block_size).astype(np.float64)
    blocks = x.reshape(-1, block_size).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    assert np.isfinite(recon).all()
    assert (recon[amax[:, 0] == 0] == 0).all()
    if type_name == "Q1_0":
        mean_abs = np.abs(blocks).mean(axis=1, keepdims=True)
        np.testing.assert_allclose(np.abs(recon), np.broadcast_to(mean_abs, recon.shape), rtol=2.0**-10, atol=2.0**-25)
        scaled = mean_abs[:, 0].astype(np.float16) > 0
        assert ((recon > 0) == (blocks >= 0))[scaled].all()
        return
    fp16_scale_error = 0.0 if type_name == "MXFP4" else 2.0**-11 * amax + 2.0**-25
    assert (np.abs(recon - blocks) <= 0.5 * amax * (1 + 1e-6) + fp16_scale_error).all()
    # the imatrix changes nothing
    np.testing.assert_array_equal(quantize_rows(x, ggml_type(type_name), qw), quantize_rows(x, ggml_type(type_name)))


def test_mxfp4_levels_are_the_nearest_with_ties_to_the_smaller() -> None:
    d = np.float32(0.25)
    steps = np.arange(-64, 65, dtype=np.float32) / 4  # |x| / d in quarter steps over -16 .. 16
    x = steps * d
    index = level_indices(x[None], np.array([d]))[0]
    levels = np.where(index < 8, MAGNITUDES[index % 8], -MAGNITUDES[index % 8])
    distance = np.abs(np.abs(steps)[:, None] - MAGNITUDES[None, :])
    nearest = MAGNITUDES[distance.argmin(axis=1)]  # argmin keeps the first, i.e. the smaller, on a tie
    np.testing.assert_array_equal(np.abs(levels), nearest)
    assert (index[steps < 0] != 8).all() and (index[(steps < 0) & (levels != 0)] >= 9).all()


def test_mxfp4_exponent_rounds_log2_as_glibc() -> None:
    """floor(log2f(a)): a float32 just below 2**4 has a log2 that rounds up to exactly 4."""
    below = np.nextafter(np.float32(16), np.float32(0))
    assert shared_exponent(np.array([below, 16, 15.5, 0, 2.0**-24], np.float32)).tolist() == [129, 129, 128, 0, 101]
    assert half_scale(np.array([0, 1, 2, 128], np.uint8)).tolist() == [2.0**-128, 2.0**-127, 2.0**-126, 1.0]


def test_ternary_packing_matches_gguf_dequantizer() -> None:
    """Every code in every position: TQ1_0's base-3 bytes and TQ2_0's 2-bit fields read back exactly."""
    rng = np.random.default_rng(0)
    levels = rng.integers(-1, 2, (64, 256)).astype(np.float32)
    levels[:, 0] = 1  # the block max is 1, so d = 1 and the levels come back as they are
    for type_name in ("TQ1_0", "TQ2_0"):
        np.testing.assert_array_equal(reconstruct(type_name, levels, None), levels)


@pytest.mark.parametrize("type_name", ["Q1_0", "Q2_0"])
def test_types_gguf_py_lacks_are_readable(type_name: str) -> None:
    kind = quant_type(ggml_type(type_name))
    assert (
        kind.qtype == ggml_type(type_name)
        and (kind.block_size, kind.type_size) == {"Q1_0": (128, 18), "Q2_0": (64, 18)}[type_name]
    )
    x = np.linspace(-1, 1, 4 * kind.block_size, dtype=np.float32).reshape(2, -1)
    assert dequantize(quantize_rows(x, kind.qtype), kind.qtype).shape == x.shape
