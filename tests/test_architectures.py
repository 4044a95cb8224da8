"""Every supported architecture against llama-imatrix, on tiny random-weight models (`tests/architectures/`).

Each folder holds a transformers checkpoint, llama.cpp's conversion of it and what llama-imatrix collected from
that conversion (`generate.py` makes them). Collected from the GGUF file and from the checkpoint directory, our
file must have llama.cpp's tensor names, shapes and counts, the same statistics (cosine ≥ 0.9999 and median
relative L2 ≤ 1e-3 per tensor, as the F16 goldens of SmolLM2, and no tensor off by more than 1e-2) and a final
perplexity within 0.5%.

A quantized GGUF (`qwen3-q4_k_m`, no checkpoint beside it) is held to a median of 5e-3 instead: llama.cpp's CPU
matmuls round activations to Q8_K before each K-quant dot product, so its later layers see inputs that differ
from the float ones by that much (its own repacked and plain kernels differ by 1.1e-3 on this model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from imatrix import CollectOptions, ImportanceMatrix, Reporter, collect
from imatrix.formats import load_imatrix

HERE = Path(__file__).resolve().parent / "architectures"
NAMES = sorted(path.parent.name for path in HERE.glob("*/imatrix.gguf"))


def spec(name: str) -> dict:
    return json.loads((HERE / name / "spec.json").read_text())


def imatrix_options(args: list[str]) -> dict:
    """llama-imatrix's `-c N --chunks N [-b N]` as collection options."""
    flags = dict(zip(args[::2], args[1::2], strict=True))
    options = {"ctx_size": int(flags["-c"]), "chunks": int(flags["--chunks"])}
    if "-b" in flags:
        options["batch_size"] = int(flags["-b"])
    return options


def golden_final_ppl(name: str) -> float:
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", (HERE / name / "ppl.txt").read_text()).group(1))


def similarity(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    a, b = ours.ravel().astype(np.float64), theirs.ravel().astype(np.float64)
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) if a.any() or b.any() else 1.0
    return float(cosine), float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_matches_llama_cpp(ours: ImportanceMatrix, theirs: ImportanceMatrix, count_tolerance: float = 0.0,
                             median_rel_l2: float = 1e-3) -> None:
    assert ours.names() == theirs.names()
    cosines, rel_l2, exact_counts = {}, {}, set()
    for name in theirs:
        assert ours[name].sums.shape == theirs[name].sums.shape, name
        if count_tolerance:  # MoE routing: near-tied router scores may pick another expert in llama.cpp
            np.testing.assert_allclose(ours[name].counts, theirs[name].counts, rtol=count_tolerance, atol=2,
                                       err_msg=name)
        else:
            assert ours[name].counts.tolist() == theirs[name].counts.tolist(), name
        cosines[name], rel_l2[name] = similarity(ours[name].mean_sq(), theirs[name].mean_sq())
        if ours[name].counts.tolist() == theirs[name].counts.tolist():
            exact_counts.add(name)
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= 0.9999, (worst, cosines[worst])
    assert np.median(list(rel_l2.values())) <= median_rel_l2
    # a wrong scale (a multiplier applied on the other side of a matmul) keeps the cosine at 1; experts that
    # a near-tie sent other tokens are off by more
    farthest = max(exact_counts, key=rel_l2.get)
    assert rel_l2[farthest] <= 1e-2, (farthest, rel_l2[farthest])


@pytest.mark.parametrize(("name", "source"), [(name, source) for name in NAMES for source in ("model.gguf", "hf")
                                              if (HERE / name / source).exists()])
def test_collects_what_llama_imatrix_collects(name: str, source: str, calibration_text: Path, tmp_path: Path) -> None:
    info = spec(name)
    options = imatrix_options(info.get("imatrix_args", ["-c", "128", "--chunks", "4"]))
    printed: list[str] = []
    result = collect(CollectOptions(model=HERE / name / source, file=calibration_text, **options,
                                    output_file=tmp_path / "imatrix.gguf"), Reporter(output=printed.append))
    theirs = load_imatrix(HERE / name / "imatrix.gguf")
    assert_matches_llama_cpp(result.matrix, theirs, info.get("count_tolerance", 0.0), info.get("median_rel_l2", 1e-3))
    assert result.ppl.final()[0] == pytest.approx(golden_final_ppl(name), rel=5e-3)
