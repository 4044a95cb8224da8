"""The compute dtype a model runs in when none is asked for: the fastest one that stays faithful.

llama.cpp's CPU backend computes a BF16 model with bf16 dot products (fp32 accumulation) where the CPU
has them. Here, a run in bfloat16 puts the whole forward in bf16 and measures Σx² in float32 from the
exact (bf16) matmul inputs; against llama-imatrix's F16 run on SmolLM2 that is within the statistics'
bounds (tests/test_precision.py), at about twice the float32 rate (benchmarks/collect_speed.py).
float16 is never chosen: a forward kept in fp16 end to end overflows on large residuals.
"""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from pathlib import Path

import torch

from imatrix.options import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def compute_dtype(requested: torch.dtype | str | None, device: torch.device | str = "cpu") -> torch.dtype:
    """`requested` (a dtype, its name, or None / "auto" for the device's fastest faithful one)."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        return DTYPES[requested]
    return torch.bfloat16 if native_bf16(torch.device(device)) else torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU that supports it, or a CPU with bf16 dot-product
    instructions (x86 AVX512_BF16 or AMX, Arm's BF16 extension). Emulated bf16 is no faster than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_dot()


@cache
def cpu_has_bf16_dot() -> bool:
    if platform.system() == "Darwin":
        return _sysctl("hw.optional.arm.FEAT_BF16") == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(flags.split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
