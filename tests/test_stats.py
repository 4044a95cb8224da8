"""`--show-statistics`: llama.cpp's golden tables digit for digit, preferred mode vs plain numpy."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from imatrix.cli.main import main
from imatrix.formats import load_imatrix, save_imatrix
from imatrix.matrix import ImportanceMatrix, TensorStats
from imatrix.stats import compute_statistics, render

C512 = "imatrix/smollm2-f16.c512.n40.imatrix"
TENSOR_FORMATS = (
    "{:>5}",
    "{:<20}",
    "{:10.2f}",
    "{:8.4f}",
    "{:11.4f}",
    "{:6.2f}",
    "{:6.2f}",
    "{:8.2f}%",
    "{:6d}",
    "{:10.4f}",
    "{:6.2f}%",
    "{:10.2f}%",
    "{:8.4f}",
)
LAYER_FORMATS = ("{:5d}", "{:14.2f}", "{:10.4f}%", "{:6.4f}")


def parse_golden(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """llama-imatrix's two tables as lists of tab-separated fields, in printed order."""
    tensors, layers = [], []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 13 and fields[0].strip().lstrip("-").isdigit():
            tensors.append(fields)
        elif len(fields) == 4 and fields[0].strip().isdigit():
            layers.append(fields)
    return tensors, layers


def tensor_fields(row) -> list[str]:
    values = (
        row.layer,
        row.kind,
        row.sum_sq,
        row.min,
        row.max,
        row.mean,
        row.std,
        100 * row.active,
        row.n,
        row.entropy,
        row.entropy_norm,
        100 * row.zd,
        row.cossim,
    )
    return [fmt.format(value) for fmt, value in zip(TENSOR_FORMATS, values, strict=True)]


def layer_fields(row) -> list[str]:
    values = (row.layer, row.sum_sq, 100 * row.zd, row.cossim)
    return [fmt.format(value) for fmt, value in zip(LAYER_FORMATS, values, strict=True)]


@pytest.fixture(scope="module")
def c512(golden) -> ImportanceMatrix:
    return load_imatrix(golden / f"{C512}.gguf")


@pytest.mark.parametrize(("suffix", "table"), [(".gguf", "stats.txt"), (".dat", "stats-legacy.txt")])
def test_legacy_statistics_match_llama_cpp(golden, suffix, table):
    gold_tensors, gold_layers = parse_golden((golden / "imatrix" / table).read_text())
    assert len(gold_tensors) == 210 and len(gold_layers) == 30
    stats = compute_statistics(load_imatrix(golden / f"{C512}{suffix}"), "legacy")
    assert [tensor_fields(row) for row in stats.tensors] == gold_tensors
    assert [layer_fields(row) for row in stats.layers] == gold_layers


def test_table_text_is_llama_cpp_output(golden, c512):
    text = render(compute_statistics(c512, "legacy", "refout/smollm2-f16.c512.n40.imatrix.gguf"))
    printed = [line for line in text.splitlines() if line]
    assert printed == (golden / "imatrix" / "stats.txt").read_text().splitlines()


def test_show_statistics_cli_prints_table(golden, capsys):
    assert main(["--in-file", str(golden / f"{C512}.gguf"), "--show-statistics"]) == 0
    tensors, layers = parse_golden(capsys.readouterr().out)
    assert (tensors, layers) == parse_golden((golden / "imatrix" / "stats.txt").read_text())


def test_json_and_csv_carry_the_same_numbers(golden, c512, capsys):
    stats = compute_statistics(c512, "preferred")
    path = str(golden / f"{C512}.gguf")
    assert main(["--in-file", path, "--show-statistics", "--stats-format", "json", "--stats-mode", "preferred"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "preferred"
    assert [t["name"] for t in data["tensors"]] == [row.name for row in stats.tensors]
    assert [t["l2"] for t in data["tensors"]] == [row.l2 for row in stats.tensors]
    assert [layer["ecs"] for layer in data["layers"]] == [row.ecs for row in stats.layers]
    assert main(["--in-file", path, "--show-statistics", "--stats-format", "csv", "--stats-mode", "preferred"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    tensor_rows = [r for r in rows if r and r[0] == "tensor"]
    layer_rows = [r for r in rows if r and r[0] == "layer"]
    assert len(tensor_rows) == 210 and len(layer_rows) == 30
    header = rows[0]
    for row, ours in zip(tensor_rows, stats.tensors, strict=True):
        assert row[header.index("name")] == ours.name
        assert float(row[header.index("cossim")]) == ours.cossim
        assert float(row[header.index("sum_sq")]) == ours.sum_sq


# ---- preferred mode against an independent numpy computation ----


def _means(stats: TensorStats) -> np.ndarray:
    counts = stats.counts.astype(np.float64)
    out = np.zeros(stats.sums.shape)
    has = counts > 0
    out[has] = stats.sums[has].astype(np.float64) / counts[has, None]
    return out


def _reference_tensor(matrix: ImportanceMatrix, name: str) -> dict:
    stats = matrix.tensors[name]
    x = _means(stats)[stats.counts > 0].ravel()
    p = x / x.sum()
    p = p[p > 0]
    h = -np.sum(p * np.log2(p))
    z = (x - x.mean()) / x.std()
    ref = {
        "n": x.size,
        "sum_sq": x.sum(),
        "mean": x.mean(),
        "std": x.std(),
        "min": x.min(),
        "max": x.max(),
        "entropy": h,
        "entropy_norm": 100 * h / np.log2(x.size),
        "zd": np.mean(np.abs(z) > 1),
        "active": np.mean(x > 1e-5),
        "l2": 0.0,
        "cossim": 0.0,
        "ecs": 0.0,
    }
    layer = int(name.split(".")[1])
    prev = name.replace(f"blk.{layer}.", f"blk.{layer - 1}.", 1)
    if prev in matrix.tensors:
        a, b = _means(stats).ravel(), _means(matrix.tensors[prev]).ravel()
        ref["l2"] = np.sqrt(np.sum((a - b) ** 2))
        ref["cossim"] = np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b))
        ref["ecs"] = 100 * np.exp(-0.01 * ref["l2"]) * abs(ref["cossim"]) ** 10
    return ref


def _reference_layer(matrix: ImportanceMatrix, layer: int) -> dict:
    def names(block):
        return sorted(n for n in matrix.tensors if n.startswith(f"blk.{block}."))

    x = np.concatenate([_means(matrix.tensors[n])[matrix.tensors[n].counts > 0].ravel() for n in names(layer)])
    ref = {"zd": np.mean(np.abs(x - x.mean()) > x.std()), "l2": 0.0, "cossim": 0.0, "ecs": 0.0}
    if layer > 0:
        a = np.concatenate([_means(matrix.tensors[n]).ravel() for n in names(layer)])
        b = np.concatenate([_means(matrix.tensors[n]).ravel() for n in names(layer - 1)])
        ref["l2"] = np.linalg.norm(a - b)
        ref["cossim"] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        ref["ecs"] = 100 * math.exp(-0.01 * ref["l2"]) * abs(ref["cossim"]) ** 10
    return ref


def _synthetic_moe() -> ImportanceMatrix:
    rng = np.random.default_rng(7)
    matrix = ImportanceMatrix(chunk_size=64)
    for layer in range(3):
        counts = rng.integers(1, 50, size=4)
        counts[layer] = 0  # one expert without tokens in each layer
        sums = rng.gamma(0.7, 2.0, size=(4, 16)).astype(np.float32) * counts[:, None]
        matrix.tensors[f"blk.{layer}.ffn_up_exps.weight"] = TensorStats(sums, counts)
        dense = rng.gamma(0.5, 3.0, size=(1, 24)).astype(np.float32) * 100
        dense[0, :3] = 0  # inactive columns
        matrix.tensors[f"blk.{layer}.attn_q.weight"] = TensorStats(dense, [100])
    return matrix


@pytest.fixture(scope="module", params=["synthetic", "moe-golden", "dense-golden"])
def preferred_case(request, golden):
    if request.param == "synthetic":
        matrix = _synthetic_moe()
    elif request.param == "moe-golden":
        matrix = load_imatrix(golden / "moe" / "tiny-qwen3moe.c256.n8.imatrix.gguf")
    else:
        matrix = load_imatrix(golden / f"{C512}.gguf")
    return matrix, compute_statistics(matrix, "preferred")


def test_preferred_tensor_statistics_match_numpy(preferred_case):
    matrix, stats = preferred_case
    assert len(stats.tensors) == len(matrix.tensors)
    for row in stats.tensors:
        ref = _reference_tensor(matrix, row.name)
        for key, expected in ref.items():
            assert getattr(row, key) == pytest.approx(expected, rel=1e-5, abs=1e-9), (row.name, key)


def test_preferred_layer_statistics_match_numpy(preferred_case):
    matrix, stats = preferred_case
    assert [row.layer for row in stats.layers] == sorted({int(n.split(".")[1]) for n in matrix.tensors})
    for row in stats.layers:
        ref = _reference_layer(matrix, row.layer)
        for key, expected in ref.items():
            assert getattr(row, key) == pytest.approx(expected, rel=1e-5, abs=1e-9), (row.layer, key)


def test_legacy_moe_skips_experts_without_tokens_and_uses_raw_sums_for_cossim():
    matrix = _synthetic_moe()
    stats = {row.name: row for row in compute_statistics(matrix, "legacy").tensors}
    row = stats["blk.1.ffn_up_exps.weight"]
    assert row.n == 3 * 16
    a = matrix.tensors["blk.1.ffn_up_exps.weight"].sums.ravel().astype(np.float64)
    b = matrix.tensors["blk.0.ffn_up_exps.weight"].sums.ravel().astype(np.float64)
    assert row.cossim == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)
    x = _means(matrix.tensors[row.name])[[0, 2, 3]].ravel()
    assert row.sum_sq == pytest.approx(x.sum(), rel=1e-5)
    assert row.zd == pytest.approx(np.mean((x - x.mean()) / x.std() > 1))  # signed Z, as llama.cpp


def test_preferred_table_renders(c512):
    text = render(compute_statistics(c512, "preferred", "x.gguf"))
    assert "L₂ Norm" in text and "ECS" in text and "H Norm" in text
    assert len([line for line in text.splitlines() if line.count("\t") == 12]) == 211


# ---- bad input ----


def test_all_zero_counts_is_an_error(tmp_path, capsys):
    matrix = ImportanceMatrix(chunk_size=512)
    matrix.tensors["blk.0.attn_q.weight"] = TensorStats(np.zeros((1, 8), np.float32), [0])
    path = tmp_path / "zero.gguf"
    save_imatrix(matrix, path)
    capsys.readouterr()
    assert main(["--in-file", str(path), "--show-statistics"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "zero.gguf" in err and "zero token count" in err


def test_file_without_tensors_is_an_error(tmp_path, capsys):
    from imatrix.formats.gguf_file import write_gguf_imatrix

    path = tmp_path / "empty.gguf"
    write_gguf_imatrix(ImportanceMatrix(chunk_size=512), path)  # what llama-imatrix --chunks 0 writes
    assert main(["--in-file", str(path), "--show-statistics"]) == 1
    err = capsys.readouterr().err
    assert "empty.gguf" in err and "no tensors" in err
    with pytest.raises(Exception, match="no tensors"):
        compute_statistics(ImportanceMatrix(), "legacy", "x")


def test_unknown_mode_is_an_error(c512):
    with pytest.raises(Exception, match="unknown statistics mode"):
        compute_statistics(c512, "fancy", "x")


def test_non_block_tensors_have_no_layer_and_no_previous(capsys):
    matrix = _synthetic_moe()
    matrix.tensors["output.weight"] = TensorStats(np.arange(1, 9, dtype=np.float32).reshape(1, 8), [4])
    for mode in ("legacy", "preferred"):
        stats = compute_statistics(matrix, mode)
        (row,) = [r for r in stats.tensors if r.name == "output.weight"]
        assert (row.layer, row.kind, row.cossim, row.l2, row.n) == ("-", "output", 0.0, 0.0, 8)
        assert [r.layer for r in stats.layers] == [0, 1, 2]
        text = render(stats)
        assert "\n    -\toutput              \t" in text


def test_json_stays_valid_with_undefined_cosine():
    matrix = ImportanceMatrix(chunk_size=8)
    matrix.tensors["blk.0.attn_q.weight"] = TensorStats(np.zeros((1, 4), np.float32), [8])
    matrix.tensors["blk.1.attn_q.weight"] = TensorStats(np.ones((1, 4), np.float32), [8])
    text = render(compute_statistics(matrix, "legacy"), "json")
    data = json.loads(text, parse_constant=lambda token: pytest.fail(f"invalid JSON constant {token}"))
    assert [t["cossim"] for t in data["tensors"] if t["name"].startswith("blk.1.")] == [None]
