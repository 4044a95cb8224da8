"""Helpers for the quantization tests: llama-quantize's golden blocks and block-wise comparisons."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from hypothesis import strategies as st

from imatrix import ImportanceMatrix
from imatrix.formats import load_imatrix, save_imatrix
from imatrix.quant.base import quantize_rows

IMATRIX = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"

# Noise weights for comparing a differing block: the imatrix with one, else what llama.cpp's kernel
# itself minimizes without one (x^2 for the IQ4 searches; the round-to-nearest `_ref` kernels
# minimize nothing in particular, so plain squared error).
ErrorWeights = Callable[[np.ndarray], np.ndarray]


def plain_weights(x: np.ndarray) -> np.ndarray:
    return np.ones_like(x)


def square_weights(x: np.ndarray) -> np.ndarray:
    return x * x


@functools.cache
def source_tensors(golden: Path) -> dict[str, np.ndarray]:
    """The F16 source tensors as float32, exactly what llama-quantize feeds its kernels."""
    reader = gguf.GGUFReader(golden / "quant" / "source-f16.gguf")
    return {t.name: np.asarray(t.data).astype(np.float32) for t in reader.tensors}


@functools.cache
def imatrix_rows(golden: Path) -> dict[str, np.ndarray]:
    """Per-column sums/counts, as llama-quantize's `load_imatrix` normalises a GGUF imatrix."""
    matrix = load_imatrix(golden / IMATRIX)
    return {name: matrix[name].mean_sq()[0] for name in matrix}


@dataclass
class Comparison:
    identical: int = 0
    total: int = 0
    worst_excess: float = 0.0  # max over differing blocks of (our error / llama.cpp's error) - 1

    @property
    def fraction(self) -> float:
        return self.identical / self.total


def block_errors(x: np.ndarray, blocks: np.ndarray, qtype: gguf.GGMLQuantizationType, w: np.ndarray) -> np.ndarray:
    """Weighted squared error of each block of `blocks` (uint8 rows of one tensor) against `x`."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    recon = gguf.quants.dequantize(blocks.reshape(-1, type_size), qtype).reshape(-1, block_size)
    diff = (recon.astype(np.float64) - x.reshape(-1, block_size)) ** 2
    return (w.reshape(-1, block_size) * diff).sum(axis=1)


def compare_with_golden(
    golden: Path, type_name: str, with_imatrix: bool, noim_weights: ErrorWeights, row_step: int = 1
) -> Comparison:
    """Quantize every tensor of `<type_name>-(im|noim).gguf` (every `row_step`-th row) and compare blocks.

    Rows are quantized independently by llama.cpp, so a subset of rows is still an exact comparison.
    """
    sources = source_tensors(golden)
    mode = "im" if with_imatrix else "noim"
    result = Comparison()
    for tensor in gguf.GGUFReader(golden / "quant" / f"{type_name}-{mode}.gguf").tensors:
        qtype = tensor.tensor_type
        x = sources[tensor.name][::row_step]
        qw = imatrix_rows(golden)[tensor.name] if with_imatrix else None
        ours = quantize_rows(x, qtype, qw)
        theirs = np.asarray(tensor.data)[::row_step]
        type_size = gguf.GGML_QUANT_SIZES[qtype][1]
        same = (ours.reshape(-1, type_size) == theirs.reshape(-1, type_size)).all(axis=1)
        result.identical += int(same.sum())
        result.total += same.size
        if not same.all():
            w = np.broadcast_to(qw, x.shape) if qw is not None else noim_weights(x)
            ours_err = block_errors(x, ours, qtype, w)[~same]
            theirs_err = block_errors(x, theirs, qtype, w)[~same]
            excess = (ours_err - theirs_err) / np.maximum(theirs_err, 1e-30)
            result.worst_excess = max(result.worst_excess, float(excess.max()))
    return result


# ----------------------------------------------------------------------------- random blocks

# Half of fp16's smallest subnormal times the largest level (127), with margin: the absolute error a
# scale rounded to fp16 can add on top of the relative bounds.
ABS_TOL = 2.0**-17
# A value of zero weight may be rounded to anything in its (sub-)block's range.
WEIGHTLESS_BOUND = 2.0


def block_cases(max_rows: int, max_blocks: int) -> dict[str, st.SearchStrategy]:
    """Hypothesis arguments for `random_rows` / `random_imatrix`: shapes, data kinds and magnitudes."""
    return {
        "seed": st.integers(0, 2**32 - 1),
        "n_rows": st.integers(1, max_rows),
        "n_blocks": st.integers(1, max_blocks),
        "kind": st.sampled_from(["normal", "zeros", "constant", "sparse", "mixed"]),
        "log_scale": st.floats(-30, 4),
        "with_imatrix": st.booleans(),
    }


def random_rows(seed: int, n_rows: int, n_cols: int, kind: str, log_scale: float) -> np.ndarray:
    """Rows whose blocks are Gaussian, all zero, constant, or mostly zero, at magnitude 10**log_scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols))
    if kind == "zeros":
        x[:] = 0.0
    elif kind == "constant":
        x[:] = x[0, 0]
    elif kind == "sparse":
        x[rng.random(x.shape) < 0.9] = 0.0
    elif kind == "mixed":
        x[:, : n_cols // 2] = 0.0
    return (x * 10.0**log_scale).astype(np.float32)


def random_imatrix(seed: int, n_cols: int) -> np.ndarray:
    """Non-negative column weights spanning decades, some exactly zero."""
    rng = np.random.default_rng(seed + 1)
    qw = 10.0 ** rng.uniform(-4, 2, n_cols)
    qw[rng.random(n_cols) < 0.1] = 0.0
    return qw.astype(np.float32)


def check_reconstruction(
    qtype: gguf.GGMLQuantizationType,
    x: np.ndarray,
    qw: np.ndarray | None,
    rel_bound: float,
    abs_tol: float = ABS_TOL,
    weightless: np.ndarray | None = None,
) -> None:
    """Invariants of any kernel: right bytes, finite values, exact zeros, near-exact constants, bounded error.

    `weightless` marks the values the kernel itself gives no weight: those need only stay within
    WEIGHTLESS_BOUND of their block's largest magnitude.
    """
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = quantize_rows(x, qtype, qw)
    assert out.dtype == np.uint8 and out.shape == (x.shape[0], x.shape[1] // block_size * type_size)
    recon = gguf.quants.dequantize(out, qtype).reshape(-1, block_size).astype(np.float64)
    blocks = x.reshape(-1, block_size).astype(np.float64)
    assert np.isfinite(recon).all()
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    err = np.abs(recon - blocks)
    bound = np.broadcast_to(rel_bound * amax + abs_tol, blocks.shape)
    weighed = np.ones(blocks.shape, bool) if weightless is None else ~weightless.reshape(blocks.shape)
    assert (err[weighed] <= bound[weighed]).all(), float((err - bound)[weighed].max())
    assert (err <= WEIGHTLESS_BOUND * amax + abs_tol).all()
    zero = amax[:, 0] == 0
    assert (recon[zero] == 0).all()
    constant = (blocks == blocks[:, :1]).all(axis=1) & ~zero
    if qw is not None:
        constant &= (np.broadcast_to(qw, x.shape).reshape(-1, block_size) > 0).all(axis=1)
    assert (err[constant] <= 2.0**-9 * amax[constant] + abs_tol).all()


# ----------------------------------------------------------------------------- synthetic models for the options

# Models llama.cpp's loader accepts (llama architecture, every hyperparameter it reads), small enough to
# build in a test: `tests/quant_options/generate.py` runs llama-quantize on them, the tests run ours.
DENSE = {"n_layer": 8, "d": 256, "ff": 256, "n_head": 4, "n_head_kv": 1, "vocab": 128, "tied": False}
MOE = {"n_layer": 2, "d": 64, "ff": 32, "n_head": 4, "n_head_kv": 2, "vocab": 64, "tied": True, "n_expert": 4,
       "file_type": None}


def identical_blocks(golden_file: Path, source: dict[str, np.ndarray], names: dict[str, str], rows: int,
                     matrix: ImportanceMatrix | None) -> tuple[int, int]:
    """(identical, total) blocks of llama-quantize's `golden_file` against ours on the same rows: each of its
    tensors made from the first `rows` rows of `source[names[tensor]]`, weighted by `matrix` when given."""
    identical = total = 0
    for tensor in gguf.GGUFReader(golden_file).tensors:
        name = names[tensor.name]
        qw = matrix[name].mean_sq()[0] if matrix is not None else None
        ours = quantize_rows(source[name][:rows], tensor.tensor_type, qw)
        type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        same = (ours.reshape(-1, type_size) == np.asarray(tensor.data).reshape(-1, type_size)).all(axis=1)
        identical += int(same.sum())
        total += same.size
    return identical, total


def gaussian_relative_rms(qtype: gguf.GGMLQuantizationType, with_imatrix: bool) -> float:
    """Relative RMS error of dequantize(quantize(x)) (gguf-py's dequantizer) on 8 Gaussian rows of 1024, equal
    weights with the imatrix (without one, each kernel weighs as its C does)."""
    x = random_rows(3, 8, 1024, "normal", 0.0)
    qw = np.ones(1024, np.float32) if with_imatrix else None
    recon = gguf.quants.dequantize(quantize_rows(x, qtype, qw), qtype)
    return float(np.sqrt(np.mean((recon - x) ** 2) / np.mean(x**2)))


def round_trip_blocks(x: np.ndarray, qtype: gguf.GGMLQuantizationType,
                      qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows `x` quantized by us (one block row per input row) and dequantized by gguf-py, and `x`, both as
    float64 super-blocks of 256 values."""
    out = quantize_rows(x, qtype, qw)
    assert out.shape == (x.shape[0], x.shape[1] // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    recon = gguf.quants.dequantize(out, qtype).reshape(-1, 256).astype(np.float64)
    return recon, x.reshape(-1, 256).astype(np.float64)


def write_smollm2_like(path: Path, tensors: dict[str, np.ndarray], context_length: int = 8192) -> None:
    """An F16 llama GGUF of `tensors` with SmolLM2-135M's hyperparameters, which llama-quantize reads
    before it quantizes (the quantization goldens' sources)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(context_length)
    writer.add_embedding_length(576)
    writer.add_block_count(30)
    writer.add_feed_forward_length(1536)
    writer.add_head_count(9)
    writer.add_head_count_kv(3)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(64)
    writer.add_vocab_size(49152)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, data in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_synthetic_llama(
    path: Path, n_layer: int, d: int, ff: int, n_head: int, n_head_kv: int, vocab: int, tied: bool,
    n_expert: int = 0, file_type: int | None = 1, seed: int = 0,
) -> Path:
    """A random llama GGUF (F16 matrices ~N(0, 0.05), F32 norms), tensors in a fixed order that is not
    llama.cpp's loader order (so that --keep-split's file order shows). `n_expert` > 0: MoE ffn tensors."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("synthetic")
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(d // n_head)
    writer.add_vocab_size(vocab)
    if n_expert:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(2)
    if file_type is not None:
        writer.add_file_type(file_type)

    def matrix(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    head_dim = d // n_head
    tensors = {"token_embd.weight": matrix(vocab, d), "output_norm.weight": np.ones(d, np.float32)}
    if not tied:
        tensors["output.weight"] = matrix(vocab, d)
    for i in range(n_layer):
        block = f"blk.{i}."
        tensors[block + "attn_norm.weight"] = np.ones(d, np.float32)
        tensors[block + "attn_q.weight"] = matrix(d, d)
        tensors[block + "attn_k.weight"] = matrix(head_dim * n_head_kv, d)
        tensors[block + "attn_v.weight"] = matrix(head_dim * n_head_kv, d)
        tensors[block + "attn_output.weight"] = matrix(d, d)
        tensors[block + "ffn_norm.weight"] = np.ones(d, np.float32)
        if n_expert:
            tensors[block + "ffn_gate_inp.weight"] = (rng.standard_normal((n_expert, d)) * 0.05).astype(np.float32)
            tensors[block + "ffn_gate_exps.weight"] = matrix(n_expert, ff, d)
            tensors[block + "ffn_up_exps.weight"] = matrix(n_expert, ff, d)
            tensors[block + "ffn_down_exps.weight"] = matrix(n_expert, d, ff)
        else:
            tensors[block + "ffn_gate.weight"] = matrix(ff, d)
            tensors[block + "ffn_up.weight"] = matrix(ff, d)
            tensors[block + "ffn_down.weight"] = matrix(d, ff)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_synthetic_imatrix(model: Path, path: Path, seed: int = 1, metadata: bool = True,
                            zero_count_expert: int | None = None) -> Path:
    """An imatrix for every `blk.*` matrix of `model` (per-expert rows and counts for 3-D tensors), as
    llama-imatrix would write one; `zero_count_expert`: that expert saw no token in every MoE tensor.
    Without `metadata` the file lacks imatrix.datasets/chunk_count/chunk_size (llama-quantize refuses it)."""
    from imatrix.ggufio.reader import GGUFModelFile
    from imatrix.matrix import TensorStats

    rng = np.random.default_rng(seed)
    source = GGUFModelFile(model)
    stats = {}
    for name, info in source.tensors.items():
        if not name.startswith("blk.") or len(info.ne) < 2 or "gate_inp" in name:
            continue
        n_mat = int(info.ne[2]) if len(info.ne) > 2 else 1
        counts = np.full(n_mat, 4096, dtype=np.int64)
        sums = rng.uniform(0.05, 3.0, (n_mat, int(info.ne[0]))).astype(np.float32) * counts[:, None]
        if zero_count_expert is not None and n_mat > 1:
            counts[zero_count_expert] = 0
            sums[zero_count_expert] = 0.0
        stats[name] = TensorStats(sums, counts)
    matrix = ImportanceMatrix(stats, chunk_size=512, chunk_count=8, datasets=["synthetic.txt"])
    if metadata:
        save_imatrix(matrix, path)
        return path
    writer = gguf.GGUFWriter(path, "")
    writer.kv_data[0].clear()
    writer.add_string("general.type", "imatrix")
    for name in matrix.names():
        entry = matrix[name]
        sums = entry.sums if entry.n_mat > 1 else entry.sums.reshape(-1)
        writer.add_tensor(name + ".in_sum2", np.ascontiguousarray(sums, dtype=np.float32))
        counts = entry.counts.astype(np.float32)
        writer.add_tensor(name + ".counts", counts.reshape(entry.n_mat, 1) if entry.n_mat > 1 else counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def split_gguf(source: Path, prefix: str, n_parts: int) -> list[Path]:
    """`source` cut into `n_parts` files as gguf-split cuts a model (tensors in file order, in contiguous
    runs): the first file holds the metadata, every file `split.no`, `split.count`, `split.tensors.count`."""
    from imatrix.ggufio.reader import GGUFModelFile, split_path

    model = GGUFModelFile(source)
    names = list(model.tensors)
    per_part = -(-len(names) // n_parts)
    paths = []
    for index in range(n_parts):
        path = split_path(prefix, index, n_parts)
        writer = gguf.GGUFWriter(path, "")
        writer.kv_data[0].clear()
        if index == 0:
            for key, stored in model.fields.items():
                writer.add_key_value(key, stored.value, stored.value_type, sub_type=stored.item_type)
        writer.add_uint16("split.no", index)
        writer.add_uint16("split.count", n_parts)
        writer.add_int32("split.tensors.count", len(names))
        for name in names[index * per_part : (index + 1) * per_part]:
            writer.add_tensor(name, np.asarray(model.raw(name)), raw_dtype=model.tensors[name].tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(path)
    return paths
