"""Rebuild the F16 model llama.cpp made from the bundled Q4_1 SmolLM2 (`llama-quantize --allow-requantize ... F16`).

Dequantizing each tensor with gguf-py and casting every non-F32 tensor to float16 gives exactly the
same tensors (the golden README records the check), so tests need not ship the 270 MB file.
"""

from __future__ import annotations

from pathlib import Path

from imatrix.quant.model import quantize_model


def write_f16_model(src_q4_1: Path, dst: Path) -> Path:
    """Write the F16 model of `src_q4_1` to `dst` (atomically) and return `dst`.

    This is llama-quantize's F16 conversion: 2-D weights become F16, 1-D norms stay F32, the
    metadata is copied and `general.file_type` becomes 1.
    """
    quantize_model(src_q4_1, dst, "F16", allow_requantize=True)
    return Path(dst)
