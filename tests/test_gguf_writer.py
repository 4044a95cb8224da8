"""Our writer packs metadata arrays in one call: the bytes must be gguf-py's, value for value."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.ggufio.writer import ModelWriter

VT = gguf.GGUFValueType


def write_metadata(writer_type: type[gguf.GGUFWriter], path: Path, fields: dict) -> bytes:
    writer = writer_type(path, "llama")
    writer.kv_data[0].clear()
    for name, (value, value_type, item_type) in fields.items():
        writer.add_key_value(name, value, value_type, sub_type=item_type)
    writer.add_tensor_info("t", (2, 4), np.dtype(np.float32), 32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path.read_bytes()


def test_same_bytes_as_gguf_py_for_a_real_vocab_and_every_array_type(smollm2_q4_1: Path, tmp_path: Path) -> None:
    model = GGUFModelFile(smollm2_q4_1)
    fields = {name: (field.value, field.value_type, field.item_type) for name, field in model.fields.items()
              if not (field.value_type == VT.ARRAY and not field.value)}
    assert len(fields["tokenizer.ggml.tokens"][0]) == 49152
    fields |= {
        "test.bools": ([True, False, True], VT.ARRAY, VT.BOOL),
        "test.f32": ([0.5, -1.25, 3e-39], VT.ARRAY, VT.FLOAT32),
        "test.i64": ([-(1 << 40), 7], VT.ARRAY, VT.INT64),
        "test.u8": ([0, 255], VT.ARRAY, VT.UINT8),
        "test.utf8": (["é", "", "日本"], VT.ARRAY, VT.STRING),
        "test.nested": ([[1, 2], [3]], VT.ARRAY, VT.ARRAY),
    }
    ours = write_metadata(ModelWriter, tmp_path / "ours.gguf", fields)
    theirs = write_metadata(gguf.GGUFWriter, tmp_path / "theirs.gguf", fields)
    assert len(ours) > 1_000_000 and ours == theirs
