"""Rewrite a deepseek2 conversion as llama.cpp's converter wrote it before it split `kv_b_proj` for the absorbed
attention: one `attn_kv_b` per layer (the checkpoint's matrix), the attention stated as multi-head (as many KV
heads as heads, key and value lengths per head) and no `*_mla` lengths. llama.cpp still loads such files and runs
them without absorption (`deepseek2.cpp`, `is_mla()` false).

    python unsplit_kv_b.py model.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

ARCH = "deepseek2"


def unsplit_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """`attn_k_b` `[n_head, kv_lora_rank, qk_nope]` and `attn_v_b` `[n_head, v_head_dim, kv_lora_rank]` -> the
    checkpoint's `kv_b_proj` `[n_head · (qk_nope + v_head_dim), kv_lora_rank]`."""
    return np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).reshape(-1, k_b.shape[1])


def old_metadata(reader: gguf.GGUFReader) -> tuple[dict[str, object], set[str]]:
    """Keys whose values change, and keys the old converter did not write."""
    value = {name: field.contents() for name, field in reader.fields.items()}
    return ({f"{ARCH}.attention.head_count_kv": value[f"{ARCH}.attention.head_count"],
             f"{ARCH}.attention.key_length": value[f"{ARCH}.attention.key_length_mla"],
             f"{ARCH}.attention.value_length": value[f"{ARCH}.attention.value_length_mla"]},
            {f"{ARCH}.attention.key_length_mla", f"{ARCH}.attention.value_length_mla"})


def rewrite(path: Path) -> None:
    reader = gguf.GGUFReader(path)
    changed, dropped = old_metadata(reader)
    target = path.with_suffix(".unsplit.gguf")
    writer = gguf.GGUFWriter(target, ARCH)
    for name, field in reader.fields.items():
        if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name in dropped:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, changed.get(name, field.contents()), kind, sub_type=sub_type)
    tensors = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    for name, data in tensors.items():
        if name.endswith("attn_k_b.weight"):
            writer.add_tensor(name.replace("attn_k_b", "attn_kv_b"),
                              unsplit_kv_b(data, tensors[name.replace("attn_k_b", "attn_v_b")]))
        elif not name.endswith("attn_v_b.weight"):
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    target.replace(path)


if __name__ == "__main__":
    rewrite(Path(sys.argv[1]))
