"""Shared fixtures: golden files written by llama.cpp and the real SmolLM2 model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from imatrix.formats import load_imatrix, save_imatrix

# CI (`.ci/run`) replays the same examples every run, so a landing never hangs on a new random draw;
# developers keep exploring fresh ones (or pass --hypothesis-seed to replay one)
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def float32_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Collections left to choose their compute dtype run in float32: results compared across paths, often bit
    for bit, must not depend on whether this machine multiplies bf16 natively (tests of bf16 ask for it, and
    command lines run in subprocesses pass --dtype float32)."""
    from imatrix.models import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
SHARED = Path(os.environ.get("IMATRIX_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden files not found at {GOLDEN} (set IMATRIX_SHARED)")
    return GOLDEN


@pytest.fixture(scope="session")
def smollm2_q4_1() -> Path:
    from imatrix.models.bundled import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def calibration_text() -> Path:
    from imatrix.models.bundled import default_calibration_text

    return default_calibration_text()


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return SHARED / "data" / "eval.txt"


@pytest.fixture(scope="session")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 12 kB of the calibration text: a few dozen short chunks (a module may define its own)."""
    from imatrix.models.bundled import default_calibration_text

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_bytes(default_calibration_text().read_bytes()[:12_000])
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama stored as F16 GGUF (a module may define its own)."""
    import numpy as np

    from tiny_models import write_tiny_llama_gguf

    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", dtype=np.float16)


@pytest.fixture(scope="session")
def moe_dat(golden: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's tiny Qwen3-MoE imatrix (c256) written as a legacy .dat: its expert stacks become one
    row of per-expert means each."""

    path = tmp_path_factory.mktemp("moe-dat") / "moe.dat"
    save_imatrix(load_imatrix(golden / "moe" / "tiny-qwen3moe.c256.n8.imatrix.gguf", chunk_size=256), path)
    return path
