"""Make the goldens of the round-to-nearest low-bit types (TQ1_0, TQ2_0, MXFP4, Q1_0, Q2_0) with llama-quantize.

    .venv/bin/python tests/quant_lowbit/generate.py --bin /work/llama/build/bin

`source-f16.gguf`: every tensor of the shared SmolLM2 source (`golden/quant/source-f16.gguf`), cut to
`ROWS` of its rows, and `blk.0.ffn_down.weight` followed by `edge_rows()` (zeros, ties, extremes), under
the llama metadata llama-quantize's loader asks for. `<TYPE>.gguf`: `llama-quantize --pure` of it.

None of these kernels reads the imatrix (ggml-quants.c's `quantize_tq1_0` etc. ignore `quant_weights`),
so the run with `--imatrix` gives the same tensor bytes; `golden.json` records the sha256 of each
tensor's bytes from both runs, and the tests check that they agree instead of storing both files.

`edge-f32.npz`: float32 inputs llama-quantize cannot take from an F16 file, or refuses to write (its
row validation rejects an MXFP4 exponent of 255 or an infinite fp16 scale) — wide exponents, subnormals,
block maxima a few ulps below a power of two — with the blocks of ggml's own `quantize_row_<type>_ref`
(called from llama.cpp's `libggml-base.so`), and its `dequantize_row_<type>` of them for the types
gguf-py cannot dequantize.

`q2_k-blocks.npz`: twelve Q2_K super-blocks of SmolLM2-135M's ffn_down (F16) with their imatrix weights,
where llama.cpp's order `w * (diff * diff)` in make_qkx3_quants decides the result (found once from the
whole model; their `where` says which), and `quantize_q2_K`'s blocks of them, remade here from the inputs.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

import imatrix.quant  # noqa: F401  (registers the types gguf-py lacks)
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.ggufio.types import type_sizes
from imatrix.quant.base import ggml_type

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quant_golden import DENSE, MOE, write_smollm2_like, write_synthetic_imatrix, write_synthetic_llama  # noqa: E402

SHARED = Path(os.environ.get("IMATRIX_SHARED", HERE.parent.parent.parent / "shared")) / "golden"
SOURCE = SHARED / "quant" / "source-f16.gguf"
IMATRIX = SHARED / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf"
ROWS = 40  # of each tensor, spread over it
EDGE_TENSOR = "blk.0.ffn_down.weight"
# file type -> what llama-quantize is asked for. The 576-column tensors are left out where the type's blocks
# do not divide them: llama.cpp defines no fallback for Q1_0, and TQ1_0 / TQ2_0 fall back to Q4_0 (legacy.py's)
FILE_TYPES = {"TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "MXFP4": "MXFP4_MOE", "Q1_0": "Q1_0", "Q2_0": "Q2_0"}
N_COLS_OF = {"Q1_0": 1536, "TQ1_0": 1536, "TQ2_0": 1536}
# whole files through the file types' mixes, on `quant_golden`'s synthetic models (their rows are whole
# blocks of every type here): llama-quantize's arguments, run in a folder holding the inputs
FILE_CASES = {
    **{
        f"dense {t} imatrix": ["--imatrix", "dense-im.gguf", "dense.gguf", "out.gguf", t, "2"]
        for t in ("TQ1_0", "TQ2_0", "Q1_0", "Q2_0")
    },
    "dense Q1_0": ["dense.gguf", "out.gguf", "Q1_0", "2"],
    "moe MXFP4_MOE": ["moe.gguf", "out.gguf", "MXFP4_MOE", "2"],
    "moe MXFP4_MOE imatrix": ["--imatrix", "moe-im.gguf", "moe.gguf", "out.gguf", "MXFP4_MOE", "2"],
}


def edge_rows(n_cols: int) -> np.ndarray:
    """Rows of cases where the kernels' rounding rules show (all exact in fp16), tiled to `n_cols`.

    Per 32 values: zeros of both signs, halfway points of every type's levels relative to a
    power-of-two maximum, values just beside them, and fp16's smallest and largest magnitudes.
    """
    steps = np.arange(32, dtype=np.float32)
    ramp = (steps - 16) / 16  # -1 .. 15/16 in steps of 1/16: every ternary / Q2_0 halfway point
    fp4_halves = np.array([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 15], np.float32) / 8
    patterns = [
        np.zeros(32, np.float32),
        np.full(32, -0.0, np.float32),
        np.full(32, 0.75, np.float32),
        ramp,
        ramp * np.float32(3.0),
        np.concatenate([fp4_halves, -fp4_halves]),  # MXFP4's level midpoints at max 15/8 (d = 1/8)
        np.concatenate([fp4_halves, -fp4_halves]) * np.float32(1 + 2**-10),
        np.where(steps % 2 == 0, np.float32(2.0**-24), np.float32(-(2.0**-23))),  # fp16 subnormals
        np.where(steps % 3 == 0, np.float32(65504.0), np.float32(-32752.0)),
        np.nextafter(ramp.astype(np.float16), np.float16(1)).astype(np.float32),  # one fp16 step above
    ]
    rows = [np.tile(p, n_cols // 32) for p in patterns]
    # halfway points in every block position (TQ1_0 packs values 0..159, 160..239, 240..255 differently)
    rng = np.random.default_rng(0)
    rows.append(rng.choice(np.float32([-1, -0.5, 0, 0.5, 1]), n_cols))
    rows.append(rng.choice(np.float32([-1, -0.5, -0.0, 0.25, 0.5, 1.5, 2]), n_cols))
    return np.stack(rows).astype(np.float16)


def write_source(path: Path) -> None:
    tensors = {}
    for tensor in gguf.GGUFReader(SOURCE).tensors:
        data = np.asarray(tensor.data)
        data = data[np.linspace(0, data.shape[0] - 1, ROWS).round().astype(int)]
        if tensor.name == EDGE_TENSOR:
            data = np.concatenate([data, edge_rows(data.shape[1])])
        tensors[tensor.name] = data
    write_smollm2_like(path, tensors, context_length=2048)


def only_columns(source: Path, path: Path, n_cols: int) -> None:
    """`source` without the tensors whose rows are not `n_cols` long."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1])
    for tensor in reader.tensors:
        if tensor.shape[0] == n_cols:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes (read by our reader: gguf-py does not know Q2_0 yet)."""
    model = GGUFModelFile(path)
    return {name: hashlib.sha256(model.raw(name).tobytes()).hexdigest() for name in model.tensors}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quantize(binary: Path, args: list[str], cwd: Path | None = None) -> None:
    subprocess.run([str(binary), *args], check=True, capture_output=True, cwd=cwd)


def build_models(folder: Path) -> None:
    """The synthetic models of the whole-file cases (`quant_golden`'s, deterministic) and their imatrices."""
    write_synthetic_llama(folder / "dense.gguf", **DENSE)
    write_synthetic_llama(folder / "moe.gguf", **MOE)
    write_synthetic_imatrix(folder / "dense.gguf", folder / "dense-im.gguf")
    write_synthetic_imatrix(folder / "moe.gguf", folder / "moe-im.gguf")


def whole_files(binary: Path, folder: Path) -> dict[str, dict[str, object]]:
    """sha256 of the file llama-quantize writes for each case of `FILE_CASES`, with the inputs' own."""
    folder.mkdir()
    build_models(folder)
    inputs = {path.name: sha256(path) for path in sorted(folder.iterdir())}
    record: dict[str, dict[str, object]] = {}
    for case, args in FILE_CASES.items():
        quantize(binary, args, cwd=folder)
        record[case] = {"args": args, "sha256": sha256(folder / "out.gguf"), "inputs": inputs}
        (folder / "out.gguf").unlink()
    return record


def edge_inputs(seed: int = 5, n: int = 1 << 12) -> dict[str, np.ndarray]:
    """float32 cases, `n` values each (a multiple of every block size)."""
    rng = np.random.default_rng(seed)
    exponents = rng.integers(-149, 120, n // 256).repeat(256).astype(np.float64)
    bits = (
        rng.integers(0, 1 << 23, n, dtype=np.uint32)
        | (rng.integers(0, 4, n, dtype=np.uint32) << 23)
        | (rng.integers(0, 2, n, dtype=np.uint32) << 31)
    )
    cases = {
        "wide_exponents": (rng.standard_normal(n) * np.exp2(exponents)).astype(np.float32),
        "subnormals": bits.view(np.float32),
    }
    for e in (-126, -125, -10, 0, 5):
        b = rng.standard_normal((n // 32, 32)).astype(np.float32)
        b /= np.abs(b).max(axis=1, keepdims=True)
        ulps = rng.integers(0, 6, (n // 32, 1)).astype(np.float32)
        cases[f"max_below_2^{e}"] = (b * (np.float32(2.0**e) * (1 - ulps * np.float32(2.0**-24)))).ravel()
    return cases


def reference_blocks(lib: ctypes.CDLL, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """ggml's `quantize_row_<name>_ref` of `x`, and its `dequantize_row_<name>` where gguf-py has none."""
    _, type_size = type_sizes(ggml_type(name))
    block_size = type_sizes(ggml_type(name))[0]
    out = np.zeros(x.size // block_size * type_size, np.uint8)
    pointer = ctypes.c_void_p
    getattr(lib, f"quantize_row_{name.lower()}_ref")(
        x.ctypes.data_as(pointer), out.ctypes.data_as(pointer), ctypes.c_int64(x.size)
    )
    if name not in ("Q1_0", "Q2_0"):
        return out, None
    back = np.zeros(x.size, np.float32)
    getattr(lib, f"dequantize_row_{name.lower()}")(
        out.ctypes.data_as(pointer), back.ctypes.data_as(pointer), ctypes.c_int64(x.size)
    )
    return out, back


def write_edge_golden(lib_path: Path, path: Path) -> None:
    lib = ctypes.CDLL(str(lib_path))
    arrays = {}
    for case, x in edge_inputs().items():
        arrays[f"{case}/input"] = x
        for name in FILE_TYPES:
            blocks, back = reference_blocks(lib, name, np.ascontiguousarray(x))
            arrays[f"{case}/{name}"] = blocks
            if back is not None:
                arrays[f"{case}/{name}/dequantized"] = back
    np.savez_compressed(path, **arrays)


def write_q2_k_blocks(lib_path: Path, path: Path) -> None:
    """Recompute the `blocks` of `q2_k-blocks.npz` from its inputs with ggml's `quantize_q2_K`."""
    lib = ctypes.CDLL(str(lib_path))
    stored = dict(np.load(path))
    blocks = np.zeros((len(stored["x"]), type_sizes(gguf.GGMLQuantizationType.Q2_K)[1]), np.uint8)
    pointer = ctypes.c_void_p
    for row, (x, weights) in enumerate(zip(stored["x"].astype(np.float32), stored["weights"], strict=True)):
        x, weights, out = np.ascontiguousarray(x), np.ascontiguousarray(weights), blocks[row]
        lib.quantize_q2_K(
            x.ctypes.data_as(pointer),
            out.ctypes.data_as(pointer),
            ctypes.c_int64(1),
            ctypes.c_int64(x.size),
            weights.ctypes.data_as(pointer),
        )
    np.savez_compressed(path, **{**stored, "blocks": blocks})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="folder of llama.cpp's binaries")
    parser.add_argument("--lib", type=Path, help="llama.cpp's libggml-base.so (default: beside the binaries)")
    args = parser.parse_args()
    binary = args.bin / "llama-quantize"
    lib = args.lib or args.bin / "libggml-base.so"
    write_edge_golden(lib, HERE / "edge-f32.npz")
    write_q2_k_blocks(lib, HERE / "q2_k-blocks.npz")
    source = HERE / "source-f16.gguf"
    write_source(source)
    tensors: dict[str, dict[str, dict[str, str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, file_type in FILE_TYPES.items():
            src = source
            if name in N_COLS_OF:
                src = Path(tmp) / f"source-{name}.gguf"
                only_columns(source, src, N_COLS_OF[name])
            with_imatrix = Path(tmp) / f"{name}-im.gguf"
            quantize(binary, ["--pure", str(src), str(HERE / f"{name}.gguf"), file_type, "2"])
            quantize(binary, ["--pure", "--imatrix", str(IMATRIX), str(src), str(with_imatrix), file_type, "2"])
            tensors[name] = {"noim": tensor_hashes(HERE / f"{name}.gguf"), "im": tensor_hashes(with_imatrix)}
            print(name, "imatrix changes nothing:", tensors[name]["im"] == tensors[name]["noim"])
        files = whole_files(binary, Path(tmp) / "models")
    (HERE / "golden.json").write_text(json.dumps({"tensors": tensors, "files": files}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
