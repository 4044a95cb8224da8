"""Whole-model quantization: llama-quantize's per-tensor type mixes, the GGUF it writes, and CLI errors."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from imatrix import ImatrixError, ImportanceMatrix
from imatrix.cli.main import main
from imatrix.formats import load_imatrix, save_imatrix
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.matrix import TensorStats
from imatrix.quant.base import quantize_rows
from imatrix.quant.hifi import HIFI_TYPE_ID, dequantize_q3_k_hifi
from imatrix.quant.mixes import FILE_TYPES, Overrides, parse_file_type, plan_types, row_bytes
from imatrix.quant.model import quantize_model

T = gguf.GGMLQuantizationType
MiB = 1024 * 1024
IMATRIX = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
N_LAYER = 30

# --- SmolLM2's tensor list, and llama.cpp's rules for it restated by hand ---


def smollm2_tensors() -> list[tuple[str, list[int], T]]:
    """(name, ggml shape, type) of SmolLM2-135M's F16 model: 30 blocks, d=576, ffn=1536, tied embeddings."""
    tensors = [("token_embd.weight", [576, 49152], T.F16), ("output_norm.weight", [576], T.F32)]
    shapes = {
        "attn_q": [576, 576], "attn_k": [576, 192], "attn_v": [576, 192], "attn_output": [576, 576],
        "ffn_gate": [576, 1536], "ffn_up": [576, 1536], "ffn_down": [1536, 576],
    }
    for i in range(N_LAYER):
        tensors += [(f"blk.{i}.{kind}.weight", shape, T.F16) for kind, shape in shapes.items()]
        tensors += [(f"blk.{i}.attn_norm.weight", [576], T.F32), (f"blk.{i}.ffn_norm.weight", [576], T.F32)]
    return tensors


SMOLLM2_META = {
    "general.architecture": "llama", "llama.block_count": N_LAYER,
    "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
}


def more_bits(i: int) -> bool:
    return i < 3 or i >= 26 or (i - 3) % 3 == 2


Pick = Callable[[int, bool], T]  # (layer, with imatrix) -> type


def const(t: T) -> Pick:
    return lambda i, im: t


# Per file type: token_embd, the 576-column tensors (after fallback), attn_v, attn_output, ffn_down.
# 576 is not a multiple of 256, so the K-quants of those fall back: Q2_K/Q3_K->Q4_0, Q4_K->Q5_0,
# Q5_K->Q5_1, Q6_K->Q8_0, IQ4_XS->IQ4_NL. Tied embeddings take the output rule (Q6_K, or Q8_0 when
# the row is not whole blocks), then the fallback.
EXPECTED: dict[str, dict[str, Pick]] = {
    "Q2_K": {"embd": const(T.Q8_0), "other": const(T.Q4_0), "attn_v": const(T.Q4_0),
             "attn_output": const(T.Q4_0), "ffn_down": const(T.Q3_K)},
    "Q3_K_S": {"embd": const(T.Q8_0), "other": const(T.Q4_0), "attn_v": const(T.Q4_0),
               "attn_output": const(T.Q4_0), "ffn_down": const(T.Q3_K)},
    "Q3_K_M": {"embd": const(T.Q8_0), "other": const(T.Q4_0),
               "attn_v": lambda i, im: T.Q5_1 if i < 2 else T.Q5_0,
               "attn_output": const(T.Q5_0), "ffn_down": lambda i, im: T.Q5_K if i < 1 else T.Q4_K},
    "Q3_K_L": {"embd": const(T.Q8_0), "other": const(T.Q4_0), "attn_v": const(T.Q5_1),
               "attn_output": const(T.Q5_1), "ffn_down": const(T.Q5_K)},
    "Q4_K_S": {"embd": const(T.Q8_0), "other": const(T.Q5_0),
               "attn_v": lambda i, im: T.Q5_1 if i < 4 else T.Q5_0,
               "attn_output": const(T.Q5_0), "ffn_down": lambda i, im: T.Q5_K if i < 3 else T.Q4_K},
    "Q4_K_M": {"embd": const(T.Q8_0), "other": const(T.Q5_0),
               "attn_v": lambda i, im: T.Q8_0 if more_bits(i) else T.Q5_0,
               "attn_output": const(T.Q5_0), "ffn_down": lambda i, im: T.Q6_K if more_bits(i) else T.Q4_K},
    "Q5_K_S": {"embd": const(T.Q8_0), "other": const(T.Q5_1), "attn_v": const(T.Q5_1),
               "attn_output": const(T.Q5_1), "ffn_down": const(T.Q5_K)},
    "Q5_K_M": {"embd": const(T.Q8_0), "other": const(T.Q5_1),
               "attn_v": lambda i, im: T.Q8_0 if more_bits(i) else T.Q5_1,
               "attn_output": const(T.Q5_1), "ffn_down": lambda i, im: T.Q6_K if more_bits(i) else T.Q5_K},
    "Q6_K": {"embd": const(T.Q8_0), "other": const(T.Q8_0), "attn_v": const(T.Q8_0),
             "attn_output": const(T.Q8_0), "ffn_down": const(T.Q6_K)},
    "Q8_0": {"embd": const(T.Q8_0), "other": const(T.Q8_0), "attn_v": const(T.Q8_0),
             "attn_output": const(T.Q8_0), "ffn_down": const(T.Q8_0)},
    "Q4_0": {"embd": const(T.Q8_0), "other": const(T.Q4_0), "attn_v": const(T.Q4_0),
             "attn_output": const(T.Q4_0), "ffn_down": lambda i, im: T.Q4_1 if im and i < 3 else T.Q4_0},
    "Q4_1": {"embd": const(T.Q8_0), "other": const(T.Q4_1), "attn_v": const(T.Q4_1),
             "attn_output": const(T.Q4_1), "ffn_down": const(T.Q4_1)},
    "Q5_0": {"embd": const(T.Q8_0), "other": const(T.Q5_0), "attn_v": const(T.Q5_0),
             "attn_output": const(T.Q5_0), "ffn_down": lambda i, im: T.Q5_1 if im and i < 3 else T.Q5_0},
    "Q5_1": {"embd": const(T.Q8_0), "other": const(T.Q5_1), "attn_v": const(T.Q5_1),
             "attn_output": const(T.Q5_1), "ffn_down": const(T.Q5_1)},
    "IQ4_NL": {"embd": const(T.Q8_0), "other": const(T.IQ4_NL), "attn_v": const(T.IQ4_NL),
               "attn_output": const(T.IQ4_NL),
               "ffn_down": lambda i, im: T.Q5_K if not im and i < 3 else T.IQ4_NL},
    "IQ4_XS": {"embd": const(T.Q8_0), "other": const(T.IQ4_NL), "attn_v": const(T.IQ4_NL),
               "attn_output": const(T.IQ4_NL),
               "ffn_down": lambda i, im: T.Q5_K if not im and i < 3 else T.IQ4_XS},
}


def expected_type(ftype: str, name: str, current: T, with_imatrix: bool) -> T:
    if name.endswith("norm.weight"):
        return current
    if name == "token_embd.weight":
        return EXPECTED[ftype]["embd"](-1, with_imatrix)
    layer, kind = re.match(r"blk\.(\d+)\.(\w+)\.weight", name).groups()
    pick = EXPECTED[ftype].get(kind, EXPECTED[ftype]["other"])
    return pick(int(layer), with_imatrix)


@pytest.mark.parametrize("with_imatrix", [False, True])
@pytest.mark.parametrize("ftype", sorted(EXPECTED))
def test_mix_choices_for_smollm2(ftype: str, with_imatrix: bool) -> None:
    tensors = smollm2_tensors()
    chosen, state = plan_types(FILE_TYPES[ftype], tensors, SMOLLM2_META, has_imatrix=with_imatrix)
    assert set(chosen) == {name for name, _, _ in tensors}
    for name, _, current in tensors:
        assert chosen[name] == expected_type(ftype, name, current, with_imatrix), (ftype, name)
    assert state.n_fallback == sum(
        n.startswith("warning: ") and "falling back" in n for n in state.fallback_notes
    )


def test_fallback_notes_read_like_llama_quantize() -> None:
    _, state = plan_types(FILE_TYPES["Q4_K_S"], smollm2_tensors(), SMOLLM2_META)
    assert state.fallback_notes[0] == (
        "warning: blk.0.attn_k.weight                  - ncols    576 not divisible by 256 (required for type    q4_K)"
        " -> falling back to    q5_0"
    )
    # every 576-column tensor but the norms; tied token_embd goes straight to Q8_0 (the output rule)
    assert state.n_fallback == 6 * N_LAYER
    _, state = plan_types(FILE_TYPES["Q4_0"], smollm2_tensors(), SMOLLM2_META)
    assert state.fallback_notes == [
        "warning: token_embd.weight                    - ncols    576 not divisible by 256 (required for type    q6_K)"
        " -> falling back to    q8_0"
    ]


def test_untied_output_and_its_flags() -> None:
    tensors = [
        ("token_embd.weight", [512, 1000], T.F16), ("output.weight", [512, 1000], T.F16),
        ("blk.0.attn_v.weight", [512, 128], T.F16), ("blk.0.attn_qkv.weight", [512, 768], T.F16),
        ("blk.0.ffn_gate_inp.weight", [512, 8], T.F32), ("position_embd.weight", [512, 64], T.F16),
    ]
    meta = {"general.architecture": "llama", "llama.block_count": 1}
    q4km = FILE_TYPES["Q4_K_M"]
    chosen, state = plan_types(q4km, tensors, meta)
    assert state.model.n_attention_wv == 2 and not state.model.tied_embeddings
    assert chosen["output.weight"] == T.Q6_K and chosen["token_embd.weight"] == T.Q4_K
    # attn_qkv counts as attn_v: use_more_bits(1, 2) holds, use_more_bits(0, 2) does not
    assert chosen["blk.0.attn_qkv.weight"] == T.Q4_K and chosen["blk.0.attn_v.weight"] == T.Q6_K
    assert chosen["blk.0.ffn_gate_inp.weight"] == T.F32 and chosen["position_embd.weight"] == T.F16
    chosen, _ = plan_types(q4km, tensors, meta, leave_output_tensor=True)
    assert chosen["output.weight"] == T.F16
    ov = Overrides(output_tensor_type=T.Q8_0, token_embedding_type=T.Q2_K, pure=True)
    chosen, _ = plan_types(q4km, tensors, meta, ov)
    assert chosen["output.weight"] == T.Q8_0 and chosen["token_embd.weight"] == T.Q2_K
    assert chosen["blk.0.attn_v.weight"] == T.Q4_K
    # tied embeddings follow --output-tensor-type
    chosen, _ = plan_types(q4km, tensors[:1], meta, Overrides(output_tensor_type=T.Q5_0))
    assert chosen["token_embd.weight"] == T.Q5_0


def test_type_overrides_must_fit_the_rows() -> None:
    tensors = [("token_embd.weight", [576, 1000], T.F16), ("blk.0.attn_q.weight", [576, 576], T.F16)]
    meta = {"general.architecture": "llama", "llama.block_count": 1}
    with pytest.raises(ImatrixError, match=r"--token-embedding-type q4_K: token_embd\.weight has rows of 576"):
        plan_types(FILE_TYPES["Q4_0"], tensors, meta, Overrides(token_embedding_type=T.Q4_K))


def test_fallback_to_f16_and_uneven_rows() -> None:
    tensors = [("blk.0.attn_q.weight", [100, 64], T.F16), ("blk.0.ffn_down.weight", [96, 64], T.F16)]
    meta = {"general.architecture": "llama", "llama.block_count": 1}
    chosen, state = plan_types(FILE_TYPES["Q4_K_S"], tensors, meta, Overrides(pure=True))
    assert chosen == {"blk.0.attn_q.weight": T.F16, "blk.0.ffn_down.weight": T.Q5_0}
    assert "must use F16" in state.fallback_notes[0]


def test_pure_choices_match_every_golden_file(golden: Path) -> None:
    """`--pure` with the fallback table gives the types llama-quantize wrote in each golden file."""
    source = gguf.GGUFReader(golden / "quant" / "source-f16.gguf")
    specs = [(t.name, [int(n) for n in t.shape], t.tensor_type) for t in source.tensors]
    files = sorted((golden / "quant").glob("*-*im.gguf"))
    assert len(files) >= 22
    for path in files:
        ftype = path.name.rsplit("-", 1)[0]
        with_imatrix = path.name.endswith("-im.gguf")
        chosen, _ = plan_types(FILE_TYPES[ftype], specs, SMOLLM2_META, Overrides(pure=True), has_imatrix=with_imatrix)
        written = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        assert chosen == written, path.name


QUALITY_MIB = {  # golden/quant/quality.md: llama-quantize's default mixes, file size in MiB
    ("Q4_0", False): 87.5, ("Q4_0", True): 87.6, ("Q4_K_M", False): 100.6, ("Q4_K_M", True): 100.6,
    ("Q3_K_S", False): 84.1, ("Q3_K_S", True): 84.1, ("Q2_K", False): 84.1, ("Q2_K", True): 84.1,
    ("IQ4_XS", False): 87.1, ("IQ4_XS", True): 86.7, ("IQ3_XXS", False): 84.5, ("IQ3_XXS", True): 82.9,
}


@functools.cache
def smollm2_layout(path: Path) -> tuple[int, list[tuple[str, list[int], T]]]:
    """Bytes before the tensor data, and the tensor list, of the real model."""
    reader = gguf.GGUFReader(path)
    return reader.tensors[0].data_offset, [(t.name, [int(n) for n in t.shape], T.F16) for t in reader.tensors]


@pytest.mark.parametrize(("ftype", "with_imatrix"), sorted(QUALITY_MIB))
def test_mix_sizes_match_llama_quantize_files(smollm2_q4_1: Path, ftype: str, with_imatrix: bool) -> None:
    """The whole-model mixes give the file sizes llama-quantize's files have (to its 0.1 MiB)."""
    overhead, specs = smollm2_layout(smollm2_q4_1)
    chosen, _ = plan_types(FILE_TYPES[ftype], specs, SMOLLM2_META, has_imatrix=with_imatrix)
    data = 0
    for name, shape, _ in specs:
        n_rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        size = row_bytes(chosen[name], shape[0]) * n_rows if len(shape) > 1 else 4 * shape[0]
        data += -(-size // 32) * 32
    assert abs((overhead + data) / MiB - QUALITY_MIB[ftype, with_imatrix]) <= 0.05


def test_parse_file_type() -> None:
    assert parse_file_type("q4_k").name == "Q4_K_M"
    assert parse_file_type("15").name == "Q4_K_M"
    assert parse_file_type("IQ4_XS").ftype == 30


# --- end to end on a small synthetic llama GGUF ---

D, FF, VOCAB, LAYERS = 256, 512, 64, 2


def write_tiny_model(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    writer.add_file_type(1)
    tensors: dict[str, np.ndarray] = {"token_embd.weight": rng.normal(size=(VOCAB, D)).astype(np.float16)}
    for i in range(LAYERS):
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(D, dtype=np.float32)
        tensors[f"blk.{i}.attn_q.weight"] = rng.normal(size=(D, D)).astype(np.float16)
        tensors[f"blk.{i}.attn_v.weight"] = rng.normal(size=(D // 2, D)).astype(np.float16)
        tensors[f"blk.{i}.ffn_down.weight"] = rng.normal(size=(D, FF)).astype(np.float16)
    tensors["output_norm.weight"] = np.ones(D, dtype=np.float32)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def tiny_imatrix(names: list[str], seed: int = 1) -> ImportanceMatrix:
    rng = np.random.default_rng(seed)
    cols = {"attn_q": D, "attn_v": D, "ffn_down": FF}
    stats = {}
    for name in names:
        n_cols = cols[name.split(".")[2]]
        stats[name] = TensorStats(rng.uniform(0.5, 4.0, size=(1, n_cols)).astype(np.float32) * 100, np.array([100]))
    return ImportanceMatrix(stats, chunk_size=512, chunk_count=3, datasets=["calib.txt"])


def test_end_to_end_tiny_model(tmp_path: Path) -> None:
    src = tmp_path / "tiny-f16.gguf"
    tensors = write_tiny_model(src)
    layer_names = [f"blk.{i}.{k}.weight" for i in range(LAYERS) for k in ("attn_q", "attn_v", "ffn_down")]
    imatrix = tiny_imatrix(layer_names)
    out = tmp_path / "tiny-q4_k_m.gguf"
    report = quantize_model(src, out, "Q4_K_M", imatrix, n_threads=2, imatrix_file="im.gguf")

    reader = gguf.GGUFReader(out)
    f = reader.fields
    assert f["general.file_type"].contents() == 15
    assert f["general.quantization_version"].contents() == 2
    assert f["general.name"].contents() == "tiny"
    assert f["tokenizer.ggml.tokens"].contents() == [f"t{i}" for i in range(VOCAB)]
    assert f["quantize.imatrix.entries_count"].contents() == len(layer_names)
    assert f["quantize.imatrix.chunks_count"].contents() == 3
    assert f["quantize.imatrix.dataset"].contents() == "calib.txt"
    keys = [k for k in f if not k.startswith("GGUF.")]
    assert keys[0] == "general.architecture"
    assert keys.index("general.quantization_version") + 1 == keys.index("general.file_type")

    # llama.cpp's order: non-block tensors first, then by block number and name
    names = [t.name for t in reader.tensors]
    assert names[:2] == ["output_norm.weight", "token_embd.weight"]
    assert names[2:] == sorted(names[2:], key=lambda n: (int(n.split(".")[1]), n))
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)

    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == T.Q6_K  # tied embeddings: the output rule
    # use_more_bits with 2 layers: only layer 1 (the last eighth)
    assert types["blk.0.attn_v.weight"] == T.Q4_K and types["blk.0.ffn_down.weight"] == T.Q4_K
    assert types["blk.1.attn_v.weight"] == T.Q6_K and types["blk.1.ffn_down.weight"] == T.Q6_K
    assert types["blk.0.attn_q.weight"] == T.Q4_K and types["blk.0.attn_norm.weight"] == T.F32
    assert report.types() == types
    assert report.missing_imatrix == ["token_embd.weight"]

    for t in reader.tensors:
        original = tensors[t.name].astype(np.float32)
        if t.tensor_type == T.F32:
            assert np.array_equal(np.asarray(t.data), original)
            continue
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(original.shape)
        assert np.abs(values - original).max() < 0.2 * np.abs(original).max(), t.name
        im_row = imatrix[t.name].mean_sq()[0] if t.name in imatrix else None
        expected = quantize_rows(original, t.tensor_type, im_row)
        assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected), t.name


def test_q3_k_hifi_file_is_q3_k_s_with_outliers(tmp_path: Path) -> None:
    """Q3_K_HIFI: Q3_K_S's choices with Q3_K stored as the outlier type; our own loader reads it back."""
    src = tmp_path / "tiny-f16.gguf"
    tensors = write_tiny_model(src)
    names = [f"blk.{i}.{k}.weight" for i in range(LAYERS) for k in ("attn_q", "attn_v", "ffn_down")]
    imatrix = tiny_imatrix(names)
    hifi = quantize_model(src, tmp_path / "hifi.gguf", "Q3_K_HIFI", imatrix).types()
    q3_k_s = quantize_model(src, tmp_path / "q3_k_s.gguf", "Q3_K_S", imatrix).types()
    assert hifi == {name: HIFI_TYPE_ID if t == T.Q3_K else t for name, t in q3_k_s.items()}
    assert sum(t == HIFI_TYPE_ID for t in hifi.values()) >= 4

    model_file = GGUFModelFile(tmp_path / "hifi.gguf")
    assert model_file.get("general.file_type") == int(HIFI_TYPE_ID)
    for name, info in model_file.tensors.items():
        assert info.tensor_type == hifi[name]
        if info.tensor_type != HIFI_TYPE_ID:
            continue
        original = tensors[name].astype(np.float32)
        im_row = imatrix[name].mean_sq()[0] if name in imatrix else None
        expected = dequantize_q3_k_hifi(quantize_rows(original, HIFI_TYPE_ID, im_row)).reshape(original.shape)
        assert np.array_equal(model_file.tensor_f32(name), expected), name
    plain = GGUFModelFile(tmp_path / "q3_k_s.gguf")
    for name in [n for n in names if hifi[n] == HIFI_TYPE_ID]:
        original = tensors[name].astype(np.float32)
        hifi_err = np.abs(model_file.tensor_f32(name) - original).sum()
        assert hifi_err < np.abs(plain.tensor_f32(name) - original).sum(), name


def test_options_pure_overrides_and_filters(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_model(src)
    out = tmp_path / "out.gguf"
    names = [f"blk.{i}.{k}.weight" for i in range(LAYERS) for k in ("attn_q", "attn_v", "ffn_down")]
    with pytest.warns(UserWarning, match="blk.1.attn_q.weight"):
        report = quantize_model(
            src, out, "Q4_K_M", tiny_imatrix(names), pure=True, token_embedding_type="q8_0",
            exclude_weights=["blk.1.attn_q"], n_threads=1,
        )
    types = report.types()
    assert types["token_embd.weight"] == T.Q8_0
    assert {types[n] for n in names} == {T.Q4_K}
    assert report.missing_imatrix == ["token_embd.weight", "blk.1.attn_q.weight"]
    assert gguf.GGUFReader(out).fields["quantize.imatrix.entries_count"].contents() == len(names) - 1

    report = quantize_model(src, out, "Q8_0", None, token_embedding_type="f16")
    assert report.types()["token_embd.weight"] == T.F16
    assert report.missing_imatrix == []


def test_requantize_with_flag(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_model(src)
    q8 = tmp_path / "q8.gguf"
    quantize_model(src, q8, "Q8_0")
    q4 = tmp_path / "q4.gguf"
    report = quantize_model(q8, q4, "Q4_0", allow_requantize=True)
    assert report.types()["blk.0.attn_q.weight"] == T.Q4_0
    assert gguf.GGUFReader(q4).fields["general.file_type"].contents() == 2


# --- bad input: one line, exit code 1 ---


def fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("imatrix: error: "), err
    for fragment in expected:
        assert fragment in err[-1]
    return err[-1]


def test_cli_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_model(src)
    out = str(tmp_path / "out.gguf")
    fails_cleanly(capsys, ["quantize", str(src), out, "Q9_Z"], "unknown quantization type 'Q9_Z'")
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    fails_cleanly(capsys, ["quantize", str(text), out, "Q4_0"], str(text), "not a GGUF file")
    fails_cleanly(capsys, ["quantize", str(tmp_path / "none.gguf"), out, "Q4_0"], "no such model file")
    q8 = tmp_path / "q8.gguf"
    assert main(["quantize", str(src), str(q8), "Q8_0"]) == 0
    fails_cleanly(capsys, ["quantize", str(q8), out, "Q4_0"], str(q8), "--allow-requantize")
    other = tmp_path / "other.imatrix.gguf"
    save_imatrix(ImportanceMatrix({"blk.0.ssm_in.weight": TensorStats(np.ones((1, 8)), np.array([1]))}, chunk_size=512),
                 other)
    fails_cleanly(capsys, ["quantize", "--imatrix", str(other), str(src), out, "Q4_0"], str(src), "another model")
    fails_cleanly(
        capsys, ["quantize", "--include-weights", "a", "--exclude-weights", "b", str(src), out, "Q4_0"], "together"
    )
    fails_cleanly(capsys, ["quantize", "--output-tensor-type", "q7_7", str(src), out, "Q4_0"], "q7_7")
    fails_cleanly(capsys, ["quantize", str(other), out, "Q4_0"], str(other), "importance matrix, not a model")
    fails_cleanly(capsys, ["quantize", str(src), str(tmp_path), "Q4_0"], "is a directory")
    assert not Path(out).exists()


def test_cli_output_named_from_the_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """llama-quantize's `<input> <type> [nthreads]`: the output is ggml-model-<TYPE>.gguf beside the input."""
    src = tmp_path / "tiny.gguf"
    write_tiny_model(src)
    assert main(["quantize", str(src), "q4_k_m", "1"]) == 0
    assert GGUFModelFile(tmp_path / "ggml-model-Q4_K_M.gguf").get("general.file_type") == 15
    # an alias, or a number, takes the first name of llama-quantize's list: the alias
    assert main(["quantize", str(src), "Q5_K", "1"]) == 0 and main(["quantize", str(src), "12", "1"]) == 0
    assert main(["quantize", str(src), str(tmp_path / "named.gguf"), "Q8_0", "1"]) == 0
    assert (tmp_path / "named.gguf").is_file()
    fails_cleanly(capsys, ["quantize", str(src), "IQ2_XS"], "requires an imatrix", "blk.0.attn_q.weight", "iq2_xs")
    fails_cleanly(capsys, ["quantize", str(src), str(tmp_path / "x.gguf"), "Q9_Z"], "unknown quantization type")
    fails_cleanly(capsys, ["quantize", str(src), str(tmp_path / "x.gguf")], "missing file type")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "ggml-model-Q3_K.gguf", "ggml-model-Q4_K_M.gguf", "ggml-model-Q5_K.gguf", "named.gguf", "tiny.gguf"]


def test_cli_never_overwrites_its_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "tiny.gguf"
    tensors = write_tiny_model(src)
    imatrix = tmp_path / "im.gguf"
    save_imatrix(tiny_imatrix([name for name in tensors if name.endswith(("attn_q.weight", "ffn_down.weight"))]),
                 imatrix)
    before = imatrix.read_bytes()
    fails_cleanly(capsys, ["quantize", "--imatrix", str(imatrix), str(src), str(imatrix), "Q4_0"], str(imatrix),
                  "also the imatrix")
    fails_cleanly(capsys, ["quantize", str(src), str(src), "Q4_0"], "also the input model")
    assert imatrix.read_bytes() == before


def test_one_shard_of_a_split_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = tmp_path / "moe-00001-of-00002.gguf"
    writer = gguf.GGUFWriter(shard, "qwen3moe")
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fails_cleanly(capsys, ["quantize", str(shard), str(tmp_path / "out.gguf"), "Q4_0"], str(shard),
                  "moe-00002-of-00002.gguf: part 2 of the split model")


def test_cli_prints_llama_quantize_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_model(src)
    assert main(["quantize", "--pure", str(src), str(tmp_path / "o.gguf"), "q4_0", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.match(r"\[\s+\d+/\s+\d+\] blk\.0\.attn_q\.weight\s+- \[\s+256,\s+256,", ln) for ln in lines)
    assert any("converting to q4_0" in ln for ln in lines)
    assert any("quant size" in ln and "BPW" in ln for ln in lines)


def test_golden_bytes_through_the_whole_pipeline(golden: Path, tmp_path: Path) -> None:
    """`--pure` on the golden F16 tensors gives llama-quantize's bytes (kernels permitting)."""
    imatrix = load_imatrix(golden / IMATRIX)
    for ftype in ("Q4_K_S", "Q8_0"):
        out = tmp_path / f"{ftype}.gguf"
        quantize_model(golden / "quant" / "source-f16.gguf", out, ftype, imatrix, pure=True)
        ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
        for t in gguf.GGUFReader(golden / "quant" / f"{ftype}-im.gguf").tensors:
            theirs = np.asarray(t.data)
            same_rows = np.mean([np.array_equal(a, b) for a, b in zip(ours[t.name], theirs, strict=True)])
            assert same_rows >= 0.99, (ftype, t.name, same_rows)


def test_moe_experts_use_their_own_imatrix_rows_on_any_number_of_workers(golden: Path, tmp_path: Path) -> None:
    """Expert tensors [n_expert, rows, cols]: expert e is quantized with imatrix row e; forked workers
    (spans split at expert boundaries) write the same bytes as one process."""
    source = golden / "moe" / "tiny-qwen3moe-f16.gguf"
    imatrix = load_imatrix(golden / "moe" / "tiny-qwen3moe.c256.n8.imatrix.gguf")
    files = {}
    for workers in (1, 2):
        files[workers] = tmp_path / f"q4_k_s-{workers}.gguf"
        with pytest.warns(UserWarning, match=r"no imatrix data for 14 tensor\(s\): blk\.0\.attn_k"):
            quantize_model(source, files[workers], "Q4_K_S", imatrix, include_weights=["blk.1."], n_threads=workers)
    assert files[1].read_bytes() == files[2].read_bytes()

    model = GGUFModelFile(source)
    checked = 0
    for t in gguf.GGUFReader(files[2]).tensors:
        if "_exps" not in t.name:
            continue
        experts = model.tensor_f32(t.name)  # [n_expert, rows, cols]
        stats = imatrix[t.name] if t.name.startswith("blk.1.") else None
        data = np.asarray(t.data).reshape(experts.shape[0], experts.shape[1], -1)
        for e, rows in enumerate(experts):
            im_row = None if stats is None else stats.mean_sq()[e]
            assert np.array_equal(data[e], quantize_rows(rows, t.tensor_type, im_row)), (t.name, e)
        checked += 1
    assert checked == 3 * int(model.arch_value("block_count"))


# --- the real model ---


@pytest.mark.slow
def test_smollm2_q4_k_m_with_imatrix(smollm2_q4_1: Path, golden: Path, tmp_path: Path) -> None:
    from imatrix.models.f16 import write_f16_model

    f16 = write_f16_model(smollm2_q4_1, tmp_path / "smollm2-f16.gguf")
    source = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(golden / "quant" / "source-f16.gguf").tensors}
    f16_reader = gguf.GGUFReader(f16)
    for t in f16_reader.tensors:
        if t.name in source:
            assert np.array_equal(np.asarray(t.data), source[t.name]), t.name
    assert f16_reader.fields["general.file_type"].contents() == 1

    out = tmp_path / "q4_k_m.gguf"
    report = quantize_model(f16, out, "Q4_K_M", load_imatrix(golden / IMATRIX), n_threads=2)
    assert abs(out.stat().st_size / MiB - 100.6) <= 0.05  # golden/quant/quality.md
    assert len(report.fallbacks) == 6 * N_LAYER
    assert report.missing_imatrix == ["token_embd.weight"]
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    for name, current in ((t.name, t.tensor_type) for t in f16_reader.tensors):
        assert types[name] == expected_type("Q4_K_M", name, current, True), name
    assert reader.fields["general.file_type"].contents() == 15
    merges = "tokenizer.ggml.merges"
    assert reader.fields[merges].contents()[:5] == f16_reader.fields[merges].contents()[:5]


@pytest.mark.parametrize("weight", [0.0, 1e-45, 3e38])
def test_degenerate_imatrix_rows_do_not_zero_a_tensor(golden: Path, tmp_path: Path, weight: float) -> None:
    name = "blk.5.ffn_down.weight"
    imatrix = load_imatrix(golden / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf")
    imatrix.tensors[name] = TensorStats(np.full_like(imatrix.tensors[name].sums, weight), [1])  # mean: weight
    out = tmp_path / "q4_k.gguf"
    with pytest.warns(UserWarning, match=r"ffn_down.weight'.*would quantize the tensor to zeros"):
        quantize_model(golden / "quant" / "source-f16.gguf", out, "Q4_K_S", imatrix, pure=True)
    values = GGUFModelFile(out).tensor_f32(name)
    assert np.count_nonzero(values) > 0.99 * values.size  # llama-quantize writes 0 of 884,736 here
    with pytest.raises(ImatrixError, match=r"ffn_down.weight'.*would quantize the tensor to zeros"):
        quantize_model(golden / "quant" / "source-f16.gguf", out, "Q4_K_S", imatrix, pure=True, strict_imatrix=True)


def test_rescaled_imatrix_rows_keep_their_ratios(golden: Path, tmp_path: Path) -> None:
    name = "blk.5.ffn_down.weight"
    imatrix = load_imatrix(golden / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf")
    reference, scaled = tmp_path / "reference.gguf", tmp_path / "scaled.gguf"
    quantize_model(golden / "quant" / "source-f16.gguf", reference, "Q4_K_S", imatrix, pure=True)
    imatrix.tensors[name].sums *= np.float32(1e-30) / imatrix.tensors[name].sums.max()
    with pytest.warns(UserWarning):
        quantize_model(golden / "quant" / "source-f16.gguf", scaled, "Q4_K_S", imatrix, pure=True)
    ours, theirs = GGUFModelFile(scaled), GGUFModelFile(reference)
    same = np.mean(ours.raw(name) == theirs.raw(name))
    assert same > 0.95  # the same weighting up to a factor: the same blocks but for float rounding
