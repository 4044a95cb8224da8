"""Make `golden.json`: what llama-quantize does with each option, on models built by `tests/quant_golden.py`.

    .venv/bin/python tests/quant_options/generate.py --bin /work/llama/build/bin

Every case runs `llama-quantize <args>` in an empty folder holding the inputs (the synthetic models and
imatrices, a split copy of the dense model, a --tensor-type-file) and records its exit status, the sha256
of every file it wrote, the per-tensor lines of a --dry-run, and, for a refusal, llama.cpp's reason. The
inputs' own sha256 are recorded too, so a test can tell a changed input from a changed quantizer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quant_golden import (  # noqa: E402
    DENSE,
    MOE,
    split_gguf,
    write_synthetic_imatrix,
    write_synthetic_llama,
)

TENSOR_TYPE_FILE = "attn_q=q8_0\nffn_up=q5_0   attn_output=q4_1\n"

# name -> (arguments after the program name, the refusal llama.cpp reports, if it must refuse)
CASES: dict[str, tuple[list[str], str | None]] = {
    "q4_k_m_imatrix": (["--imatrix", "im.gguf", "dense.gguf", "out.gguf", "Q4_K_M", "2"], None),
    "q2_k_s_imatrix": (["--imatrix", "im.gguf", "dense.gguf", "out.gguf", "Q2_K_S", "2"], None),
    "q2_k_s_without_imatrix": (["dense.gguf", "out.gguf", "Q2_K_S"], "this quantization requires an imatrix"),
    "iq2_xxs_without_imatrix": (["dense.gguf", "out.gguf", "IQ2_XXS"], "this quantization requires an imatrix"),
    "iq1_m_without_imatrix": (["dense.gguf", "out.gguf", "IQ1_M"], "this quantization requires an imatrix"),
    "iq3_xs_without_imatrix": (["dense.gguf", "out.gguf", "IQ3_XS"], "this quantization requires an imatrix"),
    "tensor_type_to_iq2_xs_without_imatrix": (
        ["--tensor-type", "ffn_up=iq2_xs", "dense.gguf", "out.gguf", "Q4_0"], "this quantization requires an imatrix"),
    "imatrix_missing_for_a_low_bit_tensor": (
        ["--imatrix", "im.gguf", "--exclude-weights", "blk.3.ffn_up", "dense.gguf", "out.gguf", "Q2_K_S"],
        "Missing importance matrix for tensor blk.3.ffn_up.weight in a very low-bit quantization"),
    "imatrix_without_metadata": (
        ["--imatrix", "im-nometa.gguf", "dense.gguf", "out.gguf", "Q4_0"], "missing imatrix metadata"),
    "tensor_type_order_and_case": (
        ["--tensor-type", "attn_q=q8_0", "--tensor-type", r"blk\.[0-3]\.ffn=q5_1", "--tensor-type", "ffn_down=q4_1",
         "--tensor-type", "ATTN_K=q6_k", "--tensor-type", "token_embd=q8_0", "dense.gguf", "out.gguf", "Q4_K_M"],
        None),
    "tensor_type_under_pure": (["--pure", "--tensor-type", "attn_v=q8_0", "dense.gguf", "out.gguf", "Q4_0"], None),
    "tensor_type_ignored_for_f16": (["--tensor-type", "attn_q=q8_0", "dense.gguf", "out.gguf", "F16"], None),
    "tensor_type_falls_back": (["--tensor-type", "ffn_down=q4_k", "moe.gguf", "out.gguf", "Q8_0"], None),
    "tensor_type_file": (
        ["--tensor-type", "attn_q=q4_1", "--tensor-type-file", "types.txt", "dense.gguf", "out.gguf", "Q5_K_M"],
        None),
    "prune_layers": (["--prune-layers", "1,5", "dense.gguf", "out.gguf", "Q4_K_M"], None),
    "prune_layers_with_imatrix": (
        ["--imatrix", "im.gguf", "--prune-layers", "0,7", "dense.gguf", "out.gguf", "Q3_K_M"], None),
    "keep_split_of_one_file": (["--keep-split", "dense.gguf", "out.gguf", "Q4_0"], None),
    "split_input": (["split-00001-of-00003.gguf", "out.gguf", "Q5_K_S"], None),
    "split_input_keep_split": (["--keep-split", "split-00001-of-00003.gguf", "out.gguf", "Q4_K_M"], None),
    "override_kv": (
        ["--override-kv", "general.name=str:renamed", "--override-kv", "llama.context_length=int:-4096",
         "--override-kv", "test.float=float:0.25", "--override-kv", "test.flag=bool:true", "dense.gguf", "out.gguf",
         "Q8_0"], None),
    "override_kv_changes_the_mix": (
        ["--override-kv", "llama.attention.head_count_kv=int:4", "dense.gguf", "out.gguf", "Q2_K"], None),
    "dry_run_needs_imatrix": (["--dry-run", "dense.gguf", "Q2_K_S"], None),
    "dry_run_iq2_m": (["--dry-run", "dense.gguf", "IQ2_M"], None),
    "dry_run_with_imatrix": (["--dry-run", "--imatrix", "im.gguf", "dense.gguf", "out.gguf", "IQ3_XXS"], None),
    "max_buffer_size": (["--max-buffer-size", "1", "dense.gguf", "out.gguf", "Q4_K_S"], None),
    "copy": (["dense.gguf", "out.gguf", "COPY"], None),
    "copy_guesses_the_file_type": (["moe.gguf", "out.gguf", "COPY"], None),
    "moe_expert_without_tokens": (["--pure", "--imatrix", "moe-im-zero.gguf", "moe.gguf", "out.gguf", "Q4_0"], None),
    "moe_iq2_xs_mix_with_imatrix_dry_run": (["--dry-run", "--imatrix", "moe-im-zero.gguf", "moe.gguf", "IQ2_S"], None),
}


# every file type's mix, by --dry-run: on the dense model without and with an imatrix, and on the MoE model
MIX_MODELS = {"dense": ["dense.gguf"], "dense-imatrix": ["--imatrix", "im.gguf", "dense.gguf"],
              "moe-imatrix": ["--imatrix", "moe-im-zero.gguf", "moe.gguf"]}
FILE_TYPES = ["Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
              "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K", "IQ3_XS",
              "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S",
              "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "COPY"]


def mix_summary(output: str) -> dict[str, object]:
    """A dry run in short: each tensor's type in order, the totals, the fallback warnings, the imatrix warning."""
    lines = output.splitlines()
    tensors = [line for line in lines if line.startswith("[") and "size =" in line]
    # a converted tensor ends in "(type)", one kept as it is shows only its own type
    types = [line.rsplit("(", 1)[1][:-1] if line.endswith(")") else line.split("type =")[1].split(",")[0].strip()
             for line in tensors]
    totals = [line.split(": ", 1)[1] for line in lines if "model size  =" in line or "quant size  =" in line]
    fallbacks = [line for line in lines if line.startswith("warning: ") and "falling back" in line]
    return {"types": " ".join(types), "totals": totals, "fallbacks": fallbacks,
            "needs_imatrix_warning": "will require an imatrix" in output}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_inputs(folder: Path) -> dict[str, str]:
    """Write every input of the cases into `folder`; returns their sha256 by file name."""
    write_synthetic_llama(folder / "dense.gguf", **DENSE)
    write_synthetic_llama(folder / "moe.gguf", **MOE)
    write_synthetic_imatrix(folder / "dense.gguf", folder / "im.gguf")
    write_synthetic_imatrix(folder / "dense.gguf", folder / "im-nometa.gguf", metadata=False)
    write_synthetic_imatrix(folder / "moe.gguf", folder / "moe-im-zero.gguf", zero_count_expert=2)
    split_gguf(folder / "dense.gguf", str(folder / "split"), 3)
    (folder / "types.txt").write_text(TENSOR_TYPE_FILE)
    return {path.name: sha256(path) for path in sorted(folder.iterdir())}


def dry_run_lines(stdout: str) -> list[str]:
    """The per-tensor size lines and the totals of a --dry-run (log prefixes differ; these do not)."""
    lines = [line for line in stdout.splitlines() if line.startswith("[") and "size =" in line]
    totals = [line for line in stdout.splitlines() if "model size  =" in line or "quant size  =" in line]
    lines += [line.split(": ", 1)[1] for line in totals]
    return lines


def run_case(binary: Path, inputs: Path, args: list[str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for path in inputs.iterdir():
            (work / path.name).symlink_to(path)
        before = set(work.iterdir())
        done = subprocess.run([str(binary), *args], cwd=work, capture_output=True, text=True)
        written = {path.name: sha256(path) for path in sorted(set(work.iterdir()) - before)}
        output = done.stdout + done.stderr
        return {
            "returncode": done.returncode,
            "outputs": written,
            "dry_run": dry_run_lines(output) if "--dry-run" in args else [],
            "needs_imatrix_warning": "will require an imatrix" in output,
            "output": output,
            "log": [line for line in output.splitlines() if "error" in line.lower() or "missing" in line.lower()
                    or "failed" in line or "applying manual override" in line],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="folder of llama.cpp's binaries")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp)
        hashes = build_inputs(inputs)
        cases = {}
        for name, (case_args, refusal) in CASES.items():
            result = run_case(args.bin / "llama-quantize", inputs, case_args)
            if refusal is not None:
                assert result["returncode"] != 0 and any(refusal in line for line in result["log"]), (name, result)
            result.pop("output")
            result["args"], result["refusal"] = case_args, refusal
            cases[name] = result
            print(f"{name}: rc {result['returncode']}, {len(result['outputs'])} file(s)")
        mixes = {}
        for model, model_args in MIX_MODELS.items():
            for file_type in FILE_TYPES:
                result = run_case(args.bin / "llama-quantize", inputs, ["--dry-run", *model_args, file_type])
                summary = mix_summary(result.pop("output"))
                summary["returncode"] = result["returncode"]
                if (model, file_type) != ("moe-imatrix", "Q4_K_M"):  # the lines once, their number always
                    summary["fallbacks"] = len(summary["fallbacks"])
                mixes[f"{model} {file_type}"] = summary
    golden = {"inputs": hashes, "tensor_type_file": TENSOR_TYPE_FILE, "cases": cases, "mixes": mixes}
    (HERE / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
