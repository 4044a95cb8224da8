"""`imatrix compare`: cosine similarity and symmetric KL of normalised importance vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imatrix.cli.main import main
from imatrix.formats import load_imatrix, save_imatrix
from imatrix.matrix import ImportanceMatrix, TensorStats
from imatrix.stats.compare import KL_EPS, compare_matrices

A = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
B = "imatrix/smollm2-f16.c256.chunk100.n20.imatrix.gguf"


def _importance(stats: TensorStats) -> np.ndarray:
    return (stats.sums.astype(np.float64) / stats.counts.astype(np.float64)[:, None]).ravel()


def _reference(va: np.ndarray, vb: np.ndarray) -> tuple[float, float]:
    p, q = va / va.sum(), vb / vb.sum()
    cos = np.dot(p, q) / np.sqrt(np.dot(p, p) * np.dot(q, q))
    p, q = (p + KL_EPS) / (1 + p.size * KL_EPS), (q + KL_EPS) / (1 + q.size * KL_EPS)
    kl = np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p))
    return cos, kl


@pytest.fixture(scope="module")
def pair(golden):
    return load_imatrix(golden / A), load_imatrix(golden / B)


def test_file_against_itself(pair):
    a, _ = pair
    result = compare_matrices(a, a)
    assert len(result.tensors) == 210 and len(result.layers) == 30
    for row in result.tensors + result.layers:
        assert row.cossim == pytest.approx(1.0, abs=1e-12)
        assert row.sym_kl == pytest.approx(0.0, abs=1e-12)
    assert result.only_a == [] and result.only_b == []


def test_two_runs_match_numpy(pair):
    a, b = pair
    result = compare_matrices(a, b)
    by_name = {row.name: row for row in result.tensors}
    assert set(by_name) == set(a.tensors)
    for name, row in by_name.items():
        cos, kl = _reference(_importance(a.tensors[name]), _importance(b.tensors[name]))
        assert row.cossim == pytest.approx(cos, rel=1e-9)
        assert row.sym_kl == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert row.n == a.tensors[name].n_cols
    for row in result.layers:
        names = sorted(n for n in a.tensors if n.startswith(f"blk.{row.name}."))
        va = np.concatenate([_importance(a.tensors[n]) for n in names])
        vb = np.concatenate([_importance(b.tensors[n]) for n in names])
        cos, kl = _reference(va, vb)
        assert row.cossim == pytest.approx(cos, rel=1e-9)
        assert row.sym_kl == pytest.approx(kl, rel=1e-6)
    # different text and context size: similar but not identical
    assert 0.5 < min(r.cossim for r in result.tensors) < 1.0
    assert max(r.sym_kl for r in result.tensors) > 0


def test_cli_json_and_table(golden, capsys):
    assert main(["compare", str(golden / A), str(golden / B), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["tensors"]) == 210 and len(data["layers"]) == 30
    assert data["only_in_a"] == [] and data["only_in_b"] == []
    assert main(["compare", str(golden / A), str(golden / B)]) == 0
    text = capsys.readouterr().out
    assert "blk.29.ffn_up.weight" in text and "SymKL" in text


def test_tensors_in_only_one_file_are_listed(pair):
    a, _ = pair
    b = a.copy()
    del b.tensors["blk.3.attn_q.weight"]
    b.tensors["output.weight"] = TensorStats(np.ones((1, 576), np.float32), [10])
    result = compare_matrices(a, b)
    assert result.only_a == ["blk.3.attn_q.weight"]
    assert result.only_b == ["output.weight"]
    assert len(result.tensors) == 209


def _save(path, tensors, value=1.0):
    matrix = ImportanceMatrix(chunk_size=512)
    for name, cols in tensors.items():
        matrix.tensors[name] = TensorStats(np.full((1, cols), value, np.float32), [512])
    save_imatrix(matrix, path)
    return str(path)


def test_disjoint_architectures_are_an_error(tmp_path, golden, capsys):
    other = _save(tmp_path / "other.gguf", {"blk.0.ssm_in.weight": 64})
    assert main(["compare", str(golden / A), other]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tensor in common" in err and "other.gguf" in err


def test_shape_mismatch_is_an_error(tmp_path, golden, capsys):
    other = _save(tmp_path / "wide.gguf", {"blk.0.attn_q.weight": 1024})
    assert main(["compare", str(golden / A), other]) == 1
    err = capsys.readouterr().err
    assert "blk.0.attn_q.weight" in err and "shape" in err and "different architectures" in err


def test_moe_gguf_against_its_legacy_dat(golden, moe_dat) -> None:
    moe = load_imatrix(golden / "moe/tiny-qwen3moe.c256.n8.imatrix.gguf", chunk_size=256)
    result = compare_matrices(moe, load_imatrix(moe_dat, chunk_size=256))
    assert len(result.tensors) == len(moe) and not result.only_a and not result.only_b
    assert min(row.cossim for row in result.tensors) > 0.999999


def test_context_size_must_be_positive(golden, capsys):
    assert main(["compare", str(golden / A), str(golden / A), "-c", "-5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ctx-size" in err and "must be > 0" in err


def test_json_has_null_where_a_value_is_not_a_number(golden):
    # files with NaN sums are refused on reading; a matrix built in memory can still hold one
    nan = ImportanceMatrix(chunk_size=512)
    nan.tensors["blk.0.attn_q.weight"] = TensorStats(np.full((1, 576), np.nan, np.float32), [512])
    row = json.loads(json.dumps(compare_matrices(load_imatrix(golden / A), nan).to_dict()))["tensors"][0]
    assert row["name"] == "blk.0.attn_q.weight" and row["sym_kl"] is None


def test_a_file_with_nan_sums_is_refused(tmp_path, golden, capsys):
    broken = _save(tmp_path / "nan.gguf", {"blk.0.attn_q.weight": 576}, value=float("nan"))
    assert main(["compare", str(golden / A), broken]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nan.gguf: tensor 'blk.0.attn_q.weight' has sums that are NaN" in err
