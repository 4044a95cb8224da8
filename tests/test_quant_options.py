"""llama-quantize's options and imatrix rules, against what llama-quantize itself did (tests/quant_options).

Each case of `quant_options/golden.json` runs `imatrix quantize` with llama-quantize's arguments on the
same synthetic inputs and must end the same way: the same exit status and the same files byte for byte
(sha256), the same --dry-run lines, the same refusal. Unit tests of the parsers follow.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from imatrix import ImatrixError
from imatrix.cli.main import main
from imatrix.formats import load_imatrix
from imatrix.ggufio.reader import GGUFModelFile, GGUFModelParts
from imatrix.quant.mixes import FILE_TYPES, Overrides, plan_types, requires_imatrix
from imatrix.quant.model import prune_names, quantize_model
from imatrix.quant.options import (
    QuantizeOptions,
    parse_max_buffer_size,
    parse_override_kv,
    parse_prune_layers,
    parse_tensor_type_option,
    tensor_type_patterns,
)
from quant_golden import DENSE, MOE, split_gguf, write_synthetic_imatrix, write_synthetic_llama

T = gguf.GGMLQuantizationType
GOLDEN = json.loads((Path(__file__).parent / "quant_options" / "golden.json").read_text())
# how we word each refusal llama-quantize reports
OUR_WORDS = {
    "this quantization requires an imatrix": "requires an imatrix",
    "missing imatrix metadata": "missing imatrix metadata",
    "Missing importance matrix for tensor": "missing importance matrix for tensor",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quant_options.generate import build_inputs

    folder = tmp_path_factory.mktemp("quant-options-inputs")
    hashes = build_inputs(folder)
    changed = sorted(name for name, digest in GOLDEN["inputs"].items() if hashes.get(name) != digest)
    assert not changed, f"the inputs changed ({changed}): rerun tests/quant_options/generate.py"
    return folder


def run_ours(inputs: Path, work: Path, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    for path in inputs.iterdir():
        (work / path.name).symlink_to(path)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code = main(["quantize", *args])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def dry_run_lines(output: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith("[") and "size =" in line]
    totals = [line for line in output.splitlines() if "model size  =" in line or "quant size  =" in line]
    return lines + [line.split(": ", 1)[1] for line in totals]


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_behaves_as_llama_quantize(case: str, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = GOLDEN["cases"][case]
    code, output = run_ours(inputs, tmp_path, expected["args"], capsys)
    assert (code == 0) == (expected["returncode"] == 0), output[-2000:]
    written = {path.name: sha256(path) for path in tmp_path.iterdir() if not path.is_symlink()}
    if expected["refusal"] is not None:
        reason = next(ours for theirs, ours in OUR_WORDS.items() if theirs in expected["refusal"])
        assert reason in output.lower(), output[-2000:]
        assert written == {}  # refused before anything was written (llama-quantize may leave a partial file)
        return
    assert written == expected["outputs"]
    if expected["dry_run"]:
        assert dry_run_lines(output) == expected["dry_run"]
    assert ("will require an imatrix" in output) == expected["needs_imatrix_warning"]
    overrides = [line.split(": ", 1)[1] for line in expected["log"] if "applying manual override" in line]
    assert [line.split(": ", 1)[1] for line in output.splitlines() if "applying manual override" in line] == overrides


@pytest.mark.parametrize("case", sorted(GOLDEN["mixes"]))
def test_every_mix_as_llama_quantize_chooses(case: str, inputs: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run of every file type llama-quantize lists: each tensor's type, the sizes, the fallbacks."""
    from quant_options.generate import MIX_MODELS, mix_summary

    model, file_type = case.split()
    expected = GOLDEN["mixes"][case]
    code, output = run_ours(inputs, tmp_path, ["--dry-run", *MIX_MODELS[model], file_type], capsys)
    if expected["returncode"]:
        assert code == 1 and "no tensor type fallback is defined" in output
        return
    ours = mix_summary(output)
    if isinstance(expected["fallbacks"], int):
        ours["fallbacks"] = len(ours["fallbacks"])  # type: ignore[arg-type]
    assert code == 0 and ours == {key: value for key, value in expected.items() if key != "returncode"}


# --- the imatrix rules, without llama-quantize ---


def test_which_types_need_an_imatrix() -> None:
    q2_k_s, q2_k = FILE_TYPES["Q2_K_S"], FILE_TYPES["Q2_K"]
    for qtype in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS):
        assert requires_imatrix("blk.0.ffn_up.weight", qtype, q2_k)
        assert not requires_imatrix("token_embd.weight", qtype, q2_k)
        assert not requires_imatrix("output.weight", qtype, q2_k)
    assert requires_imatrix("blk.0.ffn_up.weight", T.Q2_K, q2_k_s)
    assert not requires_imatrix("blk.0.ffn_up.weight", T.Q2_K, q2_k)
    for qtype in (T.IQ3_S, T.IQ4_XS, T.IQ4_NL, T.Q3_K, T.TQ1_0, T.MXFP4):
        assert not requires_imatrix("blk.0.ffn_up.weight", qtype, q2_k_s)


def test_refusal_comes_before_any_kernel_and_any_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without IQ1_S's kernel, a run without an imatrix still gets llama-quantize's reason, not ours."""
    from imatrix.quant.base import QuantType

    monkeypatch.delitem(QuantType.registry, T.IQ1_S, raising=False)
    source = write_synthetic_llama(tmp_path / "dense.gguf", **DENSE)
    out = tmp_path / "out.gguf"
    with pytest.raises(ImatrixError, match=r"requires an imatrix.*blk\.0\.attn_k\.weight.*iq1_s"):
        quantize_model(source, out, "IQ1_S")
    assert not out.exists()
    with pytest.raises(ImatrixError, match=r"requires an imatrix.*blk\.0\.attn_q\.weight.*iq2_xxs"):
        quantize_model(source, out, "Q8_0", tensor_type=["attn_q=iq2_xxs"])
    im = write_synthetic_imatrix(source, tmp_path / "im.gguf")
    with pytest.raises(ImatrixError, match="IQ1_S is not supported"):
        quantize_model(source, out, "IQ1_S", im)
    assert not out.exists()


def test_zero_count_experts_weigh_one(tmp_path: Path) -> None:
    from imatrix.quant.model import imatrix_values

    source = write_synthetic_llama(tmp_path / "moe.gguf", **MOE)
    matrix = load_imatrix(write_synthetic_imatrix(source, tmp_path / "im.gguf", zero_count_expert=2))
    values = imatrix_values(matrix, (), ())
    experts = values["blk.0.ffn_down_exps.weight"]
    assert np.all(experts[2] == 1.0) and np.all(experts[1] != 1.0)


def test_imatrix_keys_as_llama_quantize_writes_them(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "dense.gguf", **DENSE)
    matrix = load_imatrix(write_synthetic_imatrix(source, tmp_path / "im.gguf"))
    matrix.datasets = ["é" * 100]  # 200 bytes: cut at 127 bytes, inside a character, as strncpy cuts it
    out = tmp_path / "out.gguf"
    quantize_model(source, out, "Q4_0", matrix, imatrix_file="x" * 200 + ".gguf", n_threads=1)
    fields = GGUFModelFile(out).fields
    assert fields["quantize.imatrix.file"].value == b"x" * 127
    assert fields["quantize.imatrix.dataset"].value == ("é" * 100).encode()[:127]
    assert fields["quantize.imatrix.entries_count"].value_type == gguf.GGUFValueType.UINT32
    assert fields["quantize.imatrix.chunks_count"].value == 8
    keys = list(fields)
    assert keys[-4:] == ["quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                         "quantize.imatrix.chunks_count"]


# --- options, parsed ---


def test_tensor_type_texts() -> None:
    assert parse_tensor_type_option("ATTN_Q=Q8_0") == ("attn_q", T.Q8_0)
    assert parse_tensor_type_option(r"blk\.1\.=iq2_xxs") == (r"blk\.1\.", T.IQ2_XXS)
    for bad, reason in (("attn_q", "malformed"), ("=q8_0", "missing tensor name"), ("attn_q=", "missing quantization"),
                        ("attn_q=q9_9", "invalid quantization type")):
        with pytest.raises(ImatrixError, match=reason):
            parse_tensor_type_option(bad)
    with pytest.raises(ImatrixError, match="invalid regular expression"):
        tensor_type_patterns(["attn_(q=q8_0"])


def test_first_tensor_type_match_wins_and_skips_the_counters() -> None:
    tensors = [(f"blk.{i}.attn_v.weight", [256, 64], T.F16) for i in range(8)]
    meta = {"general.architecture": "llama", "llama.block_count": 8, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 4}
    patterns = tensor_type_patterns([r"blk\.0\.=q8_0", "attn_v=q4_0", r"blk\.0\.attn_v=q5_0"])
    chosen, state = plan_types(FILE_TYPES["Q3_K_M"], tensors, meta, Overrides(tensor_types=patterns[:1]))
    # Q3_K_M gives attn_v Q5_K while its counter is below 2: layer 0 is manual, so layers 1 and 2 get it
    assert [chosen[f"blk.{i}.attn_v.weight"] for i in range(4)] == [T.Q8_0, T.Q5_K, T.Q5_K, T.Q4_K]
    assert state.override_notes == [
        f"llama_tensor_get_type: {'blk.0.attn_v.weight':<36} - applying manual override: q3_K -> q8_0"]
    chosen, _ = plan_types(FILE_TYPES["Q3_K_M"], tensors, meta, Overrides(pure=True, tensor_types=patterns))
    assert chosen["blk.0.attn_v.weight"] == T.Q8_0 and chosen["blk.1.attn_v.weight"] == T.Q4_0


def test_prune_layers_renumbers_as_remap_layer_does() -> None:
    names = ["output.weight", *[f"blk.{i}.attn_q.weight" for i in range(6)]]
    kept, block_count = prune_names(names, parse_prune_layers("4,1,1"))
    assert block_count == 4
    assert kept == {"output.weight": "output.weight", "blk.0.attn_q.weight": "blk.0.attn_q.weight",
                    "blk.2.attn_q.weight": "blk.1.attn_q.weight", "blk.3.attn_q.weight": "blk.2.attn_q.weight",
                    "blk.5.attn_q.weight": "blk.3.attn_q.weight"}
    assert prune_names(names, ()) == ({name: name for name in names}, None)
    for bad in ("1,x", "-1", "1,,2"):
        with pytest.raises(ImatrixError, match="invalid layer id"):
            parse_prune_layers(bad)


def test_override_kv_texts() -> None:
    assert parse_override_kv("a.b=int:-7").stored() == (7, gguf.GGUFValueType.UINT32)
    assert parse_override_kv("a.b=int:12abc").value == 12
    assert parse_override_kv("a.b=float:1e-2x").stored() == (0.01, gguf.GGUFValueType.FLOAT32)
    assert parse_override_kv("a.b=bool:false").stored() == (False, gguf.GGUFValueType.BOOL)
    assert parse_override_kv("a.b=str:x=y:z").value == "x=y:z"
    for bad, reason in (("a.b", "malformed"), ("a.b=int", "invalid type"), ("a.b=u8:1", "invalid type"),
                        ("a.b=bool:yes", "invalid boolean"), ("a.b=str:" + "x" * 128, "127"),
                        ("k" * 128 + "=int:1", "malformed")):
        with pytest.raises(ImatrixError, match=reason):
            parse_override_kv(bad)


def test_max_buffer_size_texts() -> None:
    assert parse_max_buffer_size("64") == 64 and parse_max_buffer_size("5MiB") == 5
    for bad in ("0", "-3", "abc", ""):
        with pytest.raises(ImatrixError, match="invalid --max-buffer-size"):
            parse_max_buffer_size(bad)


def test_options_as_keywords_or_a_value(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "dense.gguf", **DENSE)
    by_keywords = quantize_model(source, None, "Q4_0", dry_run=True, tensor_type=["attn_q=q8_0"])
    by_value = quantize_model(source, None, "Q4_0", options=QuantizeOptions(dry_run=True, tensor_type=["attn_q=q8_0"]))
    assert by_keywords.types() == by_value.types()
    assert by_value.types()["blk.0.attn_q.weight"] == T.Q8_0 and by_value.output_paths == []
    with pytest.raises(TypeError):
        quantize_model(source, None, "Q4_0", dry_run=True, no_such_flag=True)


# --- split models ---


def test_split_model_is_read_as_one(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "dense.gguf", **DENSE)
    parts = split_gguf(source, str(tmp_path / "m"), 3)
    whole, split = GGUFModelFile(source), GGUFModelParts(parts[0])
    assert list(split.tensors) == list(whole.tensors)
    assert [split.part_of[name] for name in split.tensors][::25] == [0, 1, 2]
    for name in whole.tensors:
        assert np.array_equal(split.raw(name), whole.raw(name))
    assert "split.count" in split.metadata


def test_split_model_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_synthetic_llama(tmp_path / "dense.gguf", **DENSE)
    parts = split_gguf(source, str(tmp_path / "m"), 3)
    with pytest.raises(ImatrixError, match="part 2 of a model split in 3 files: open the first part"):
        GGUFModelParts(parts[1])
    renamed = tmp_path / "renamed.gguf"
    renamed.symlink_to(parts[0])
    with pytest.raises(ImatrixError, match="invalid split file name"):
        GGUFModelParts(renamed)
    parts[2].unlink()
    with pytest.raises(ImatrixError, match="part 3 of the split model .* is missing"):
        GGUFModelParts(parts[0])
    # every other reader still refuses a part on its own
    with pytest.raises(ImatrixError, match="part 1 of a model split in 3 files"):
        GGUFModelFile(parts[0])


def test_max_buffer_size_bounds_the_rows_held_at_once() -> None:
    """A span holds at most --max-buffer-size of a tensor's rows, counted as llama.cpp counts them (input
    row, output row and its float32 copy), and never less than one row."""
    from imatrix.ggufio.header import TensorInfo
    from imatrix.quant.model import MIB_BYTES, _Job, tensor_spans

    info = TensorInfo("blk.0.ffn_down.weight", (4096, 512), T.F16, 0)
    job = _Job(info, info.name, info.ne, T.F16, T.Q4_0, None, 0)
    per_row = 4096 * 2 + 4096 // 32 * 18 + 4096 * 4
    default = tensor_spans(job, 0)
    assert max(span.stop - span.start for span in default) == (1 << 18) // 4096
    one_mib = tensor_spans(job, 0, MIB_BYTES)
    assert max(span.stop - span.start for span in one_mib) == MIB_BYTES // per_row
    assert [span.start for span in tensor_spans(job, 0, 1)] == list(range(512))
    assert one_mib[-1].stop == 512 and one_mib[1].offset == (MIB_BYTES // per_row) * 4096 // 32 * 18


@pytest.mark.parametrize(("flags", "reason"), [
    (["--prune-layers", "1,x"], "invalid layer id 'x'"),
    (["--max-buffer-size", "0"], "invalid --max-buffer-size '0'"),
    (["--tensor-type", "attn_q"], "malformed tensor type"),
    (["--tensor-type", "(=q8_0"], "invalid regular expression"),
    (["--tensor-type-file", "no-such-file.txt"], "cannot read"),
    (["--override-kv", "a.b=u8:1"], "invalid type for KV override"),
])
def test_bad_flags_fail_cleanly(flags: list[str], reason: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    source = write_synthetic_llama(tmp_path / "m.gguf", **MOE)
    assert main(["quantize", *flags, str(source), str(tmp_path / "out.gguf"), "Q4_0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("imatrix: error: ") and reason in err[-1]
    assert not (tmp_path / "out.gguf").exists()
