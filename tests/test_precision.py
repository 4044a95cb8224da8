"""The compute dtype: bfloat16 by default where it is native, and within the statistics' bounds of llama.cpp."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from imatrix import CollectOptions, collect
from imatrix.formats import load_imatrix
from imatrix.models import precision
from imatrix.models.loader import load_model


def test_a_requested_dtype_is_kept() -> None:
    assert precision.compute_dtype(torch.float16) is torch.float16
    assert precision.compute_dtype("float32") is torch.float32


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_where_native(monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert precision.compute_dtype(None) is expected
    assert precision.compute_dtype("auto", "cpu") is expected


def test_the_cpu_check_reads_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(precision.cpu_has_bf16_dot(), bool)
    assert precision.native_bf16(torch.device("meta")) is False


@pytest.mark.slow
def test_bfloat16_stays_within_the_bounds_of_llama_imatrix(smollm2_q4_1: Path, calibration_text: Path,
                                                            golden: Path) -> None:
    """Against llama-imatrix's F16 run: cosine >= 0.9999 and median relative L2 <= 2e-3 per tensor, PPL within 0.3%
    (llama.cpp's own BF16 run of the same model lies at 0.99999 and 5e-4)."""
    model = load_model(smollm2_q4_1, round_to_f16=True, dtype=torch.bfloat16)
    result = collect(CollectOptions(model=model, file=calibration_text, ctx_size=512, chunks=8, dtype=torch.bfloat16))
    theirs = load_imatrix(golden / "imatrix/smollm2-f16.c512.n8.po.imatrix.gguf")
    cosines, rel_l2 = [], []
    for name in theirs:
        ours_mean, their_mean = (m[name].mean_sq().ravel().astype(np.float64) for m in (result.matrix, theirs))
        cosines.append(ours_mean @ their_mean / np.linalg.norm(ours_mean) / np.linalg.norm(their_mean))
        rel_l2.append(np.linalg.norm(ours_mean - their_mean) / np.linalg.norm(their_mean))
    assert min(cosines) >= 0.9999
    assert np.median(rel_l2) <= 2e-3
    final = float(re.search(r"Final estimate: PPL = ([0-9.]+)", (golden / "imatrix/imatrix-po.ppl.txt").read_text())[1])
    assert result.ppl.final()[0] == pytest.approx(final, rel=3e-3)
