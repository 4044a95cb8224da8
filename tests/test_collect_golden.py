"""End-to-end collection on the real SmolLM2 (F16, as llama.cpp ran it) against llama-imatrix's files."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from imatrix import CollectOptions, ImatrixError, ImportanceMatrix, Reporter, collect
from imatrix.collection.run import CollectResult
from imatrix.formats import load_imatrix
from imatrix.models.loader import LoadedModel, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_q4_1: Path) -> LoadedModel:
    # rounding the dequantized Q4_1 weights to F16 gives llama.cpp's F16 model exactly (golden README)
    return load_model(smollm2_q4_1, round_to_f16=True)


def run(model: LoadedModel, text: Path, out: Path, **options: object) -> tuple[CollectResult, str]:
    printed: list[str] = []
    reporter = Reporter(output=printed.append, messages=lambda line: print(line, file=sys.stderr))
    result = collect(CollectOptions(model=model, file=text, output_file=out, dataset_name="corpus/calibration.txt",
                                    **options), reporter)
    return result, "".join(printed)


def golden_ppl(path: Path) -> tuple[list[float], float]:
    log = path.read_text()
    chunks = [float(value) for value in re.findall(r"\[\d+\]([0-9.]+),", log)]
    return chunks, float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))


def assert_matches_golden(ours: ImportanceMatrix, theirs: ImportanceMatrix) -> None:
    assert ours.names() == theirs.names()
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (theirs.chunk_count, theirs.chunk_size,
                                                                   theirs.datasets)
    cosines, rel_l2 = [], []
    for name in theirs:
        assert ours[name].counts.tolist() == theirs[name].counts.tolist(), name
        a, b = ours[name].mean_sq().ravel().astype(np.float64), theirs[name].mean_sq().ravel().astype(np.float64)
        cosines.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        rel_l2.append(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert min(cosines) >= 0.999
    assert np.median(rel_l2) <= 1e-3
    assert max(rel_l2) <= 5e-2


def assert_ppl_matches(result: CollectResult, printed: str, log: Path) -> None:
    chunks, final = golden_ppl(log)
    np.testing.assert_allclose(result.chunk_ppl, chunks, rtol=3e-3)
    ours_final = float(re.search(r"Final estimate: PPL = ([0-9.]+) \+/- [0-9.]+", printed).group(1))
    assert abs(ours_final / final - 1) <= 3e-3
    assert re.findall(r"\[(\d+)\][0-9.]+,", printed) == [str(i + 1) for i in range(len(chunks))]
    # llama.cpp's saves show in its log as line breaks, before the ppl lines of the batch that saved
    assert ppl_lines(printed) == ppl_lines(log.read_text())


def ppl_lines(log: str) -> list[list[str]]:
    return [found for line in log.split("\n") if (found := re.findall(r"\[(\d+)\]", line))]


def test_c512_40_chunks(capsys: pytest.CaptureFixture[str], smollm2_f16: LoadedModel, calibration_text: Path,
                        golden: Path, tmp_path: Path) -> None:
    out = tmp_path / "imatrix.gguf"
    result, printed = run(smollm2_f16, calibration_text, out, ctx_size=512, chunks=40)
    assert "computing over 40 chunks, n_ctx=512, batch_size=2048, n_seq=4" in capsys.readouterr().err
    golden_file = golden / "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
    assert_matches_golden(load_imatrix(out), load_imatrix(golden_file))
    assert_ppl_matches(result, printed, golden / "imatrix/imatrix-f16.ppl.txt")


def test_c256_from_chunk_100(capsys: pytest.CaptureFixture[str], smollm2_f16: LoadedModel, calibration_text: Path,
                             golden: Path, tmp_path: Path) -> None:
    out = tmp_path / "imatrix.gguf"
    result, printed = run(smollm2_f16, calibration_text, out, ctx_size=256, from_chunk=100, chunks=20)
    assert "n_ctx=256, batch_size=2048, n_seq=8" in capsys.readouterr().err
    golden_file = golden / "imatrix/smollm2-f16.c256.chunk100.n20.imatrix.gguf"
    assert_matches_golden(load_imatrix(out), load_imatrix(golden_file))
    assert_ppl_matches(result, printed, golden / "imatrix/imatrix-f16-c256.ppl.txt")


def test_process_output_with_tied_embeddings(smollm2_f16: LoadedModel, calibration_text: Path, golden: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "imatrix.gguf"
    result, printed = run(smollm2_f16, calibration_text, out, ctx_size=512, chunks=8, process_output=True)
    ours = load_imatrix(out)
    assert "output.weight" not in ours  # tied: llama.cpp has no output.weight matmul to observe
    assert_matches_golden(ours, load_imatrix(golden / "imatrix/smollm2-f16.c512.n8.po.imatrix.gguf"))
    assert_ppl_matches(result, printed, golden / "imatrix/imatrix-po.ppl.txt")


def test_results_do_not_depend_on_batch_size(smollm2_f16: LoadedModel, calibration_text: Path,
                                             tmp_path: Path) -> None:
    one_per_batch, _ = run(smollm2_f16, calibration_text, tmp_path / "a.gguf", ctx_size=256, batch_size=256,
                           chunks=4, ppl=False)
    four_per_batch, _ = run(smollm2_f16, calibration_text, tmp_path / "b.gguf", ctx_size=256, batch_size=1024,
                            chunks=4, ppl=False)
    for name in one_per_batch.matrix:
        assert one_per_batch.matrix[name].counts.tolist() == four_per_batch.matrix[name].counts.tolist() == [1024]
        np.testing.assert_allclose(one_per_batch.matrix[name].sums, four_per_batch.matrix[name].sums, rtol=2e-4)


def test_no_ppl_still_collects_every_block(smollm2_f16: LoadedModel, calibration_text: Path, tmp_path: Path) -> None:
    result, printed = run(smollm2_f16, calibration_text, tmp_path / "x.gguf", ctx_size=128, chunks=2,
                          ppl=False)
    assert "Final estimate" not in printed and "[1]" not in printed
    assert len(result.matrix) == 210 and result.matrix.chunk_count == 2


def test_non_finite_activations_stop_the_run(smollm2_f16: LoadedModel, calibration_text: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "imatrix.gguf"
    out.write_bytes(b"previous result")
    weight = smollm2_f16.model.model.layers[3].mlp.down_proj.weight
    saved = weight[0, 0].item()
    try:
        weight.data[0, 0] = float("inf")
        with pytest.raises(ImatrixError, match=r"non-finite .* 'blk\.4\.attn_(q|k|v)\.weight'"):
            run(smollm2_f16, calibration_text, out, ctx_size=128, chunks=2)
    finally:
        weight.data[0, 0] = saved
    assert out.read_bytes() == b"previous result"


def test_save_frequency_snapshots(smollm2_f16: LoadedModel, calibration_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "imatrix.gguf"
    run(smollm2_f16, calibration_text, out, ctx_size=128, batch_size=256, chunks=6, ppl=False,
        output_frequency=2, save_frequency=4)
    assert load_imatrix(tmp_path / "imatrix.gguf.at_4").chunk_count == 4
    assert load_imatrix(out).chunk_count == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.gguf", "imatrix.gguf.at_4"]
