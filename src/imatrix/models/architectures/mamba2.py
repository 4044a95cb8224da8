"""The Mamba2 mixer as llama.cpp's converter stores it (`Mamba2Model.modify_tensors`), for the hybrid
families built on it (Falcon-H1, Granite 4).

Apart from renames, it squeezes `conv1d` to 2-D and reshapes `A`, `D` and the grouped norm, which
loading reshapes back, and stores the decay as A = -exp(A_log).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture, Config, TensorRule

ARCHITECTURES: tuple[Architecture, ...] = ()  # pieces only: the families list themselves


def mamba2_config(model_file: GGUFModelFile) -> dict[str, Any]:
    """The mixer's shape, under the `mamba_*` names Falcon-H1's and Granite 4's configs share."""
    n_heads = int(model_file.require_arch("ssm.time_step_rank"))
    return {"mamba_n_heads": n_heads, "mamba_d_head": int(model_file.require_arch("ssm.inner_size")) // n_heads,
            "mamba_d_state": int(model_file.require_arch("ssm.state_size")),
            "mamba_n_groups": int(model_file.require_arch("ssm.group_count")),
            "mamba_d_conv": int(model_file.require_arch("ssm.conv_kernel")),
            "mamba_conv_bias": any(name.endswith(".ssm_conv1d.bias") for name in model_file.tensors)}


def a_log(values: np.ndarray, config: Config, name: str) -> np.ndarray:
    return np.log(-values.astype(np.float32))


MAMBA2_RULES = (TensorRule(r"\.ssm_a$", a_log),)
# the converter renames `dt_bias` to `dt_proj.bias` before mapping it; gguf-py's map knows only the latter
MAMBA2_NAMES = ((r"model\.layers\.(\d+)\.mamba\.dt_bias", r"blk.\1.ssm_dt.bias"),)
