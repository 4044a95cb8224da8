"""Split GGUF tensor names into (layer, kind) the way llama-imatrix's statistics do."""

from __future__ import annotations

import re

_LEADING_INT = re.compile(r"\s*([+-]?\d+)")
_BLOCK = re.compile(r"blk\.(\d+)\.")


def split_name(name: str) -> tuple[str, str]:
    """`blk.3.attn_q.weight` -> ("3", "attn_q"); names without `blk.N` get layer "-"."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i in range(len(parts) - 1) if parts[i] == "blk"), "")
    kind = next((parts[i - 1] for i in range(1, len(parts)) if parts[i] == "weight"), "")
    return layer or "-", kind or name


def layer_number(layer: str) -> int:
    """Integer block index, -1 for non-block tensors (parses a leading integer like `std::stoi`)."""
    match = _LEADING_INT.match(layer)
    return int(match.group(1)) if match else -1


def previous_block_name(name: str) -> str | None:
    """Same tensor one block earlier (`blk.4.x` -> `blk.3.x`), None for non-block tensors."""
    match = _BLOCK.search(name)
    if match is None:
        return None
    block = int(match.group(1))
    return name[: match.start(1)] + str(block - 1) + name[match.end(1) :]
