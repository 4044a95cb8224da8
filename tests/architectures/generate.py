"""Regenerate the tiny architecture models and their llama.cpp goldens (`tests/architectures/<name>/`).

Each folder holds a `spec.json`; from it this script writes
  hf/            a random-weight transformers checkpoint (config, float16 safetensors, tokenizer)
  model.gguf     that checkpoint converted by llama.cpp's own `convert_hf_to_gguf.py --outtype f16`
  imatrix.gguf   `llama-imatrix -m model.gguf -f calibration.txt <spec's imatrix_args>`
  ppl.txt        llama-imatrix's per-chunk perplexity lines (stdout)

llama.cpp is the copy vendored in the PyPI sdist `llama-cpp-python==0.3.36`, built outside this repository:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DLLAMA_CURL=OFF
    cmake --build build -j2 --target llama-imatrix
Run with the project's environment plus `sentencepiece` (for the SentencePiece tokenizers) and `timm` (Gemma 3n's
multimodal checkpoint, whose vision tower is a timm model):
    python tests/architectures/generate.py --llama-cpp <vendor/llama.cpp> --bin <build/bin> [name ...]

spec.json keys (all but model_class/config_class optional):
  model_class, config_class   transformers classes (`Gemma3ForCausalLM`, `Gemma3TextConfig`; a multimodal checkpoint's:
                              `Gemma3ForConditionalGeneration`, `Gemma3Config`)
  config                      keyword arguments of the config; vocab and special ids are added (to its `text_config`
                              where it has one: a multimodal checkpoint, whose text model llama.cpp converts)
  tokenizer                   "bpe" (SmolLM2's byte-level BPE cut to 1024 tokens, pre-tokenizer "smollm")
                              or "spm" (a SentencePiece BPE trained on the calibration text)
  tokenizer_class             the transformers tokenizer class for "spm" (default LlamaTokenizer)
  pre                         the pre-tokenizer the converter states for a "bpe" vocabulary (default "smollm");
                              "qwen2" where AutoTokenizer imposes its model type's class (Qwen2Tokenizer, Qwen's regex)
  spm_model                   whether an "spm" checkpoint ships its tokenizer.model besides tokenizer.json (default
                              true; Gemma 4's converter reads tokenizer.json alone)
  vocab_size                  the tokenizer's vocabulary size (default 1024), smaller where per-token tables
                              dominate the model (Gemma 3n's per-layer embeddings)
  tokenizer_config            extra tokenizer_config.json entries; extra_special_tokens: more control tokens
  add_bos                     whether the tokenizer adds BOS (default false)
  init_std                    the config's initializer_range (default 0.1); norms, biases and the routers'
                              selection biases get noise too
  perturb                     endings of more parameter (or buffer) names that get that noise, where their init
                              would leave a path unmeasured or untested (Gemma 3n's zero AltUp output scale)
  hf_config                   entries written over the saved config.json, to state it as published checkpoints
                              do (Granite 4's legacy `layer_types` names, which the converter reads)
  converter_vocab             a vocabulary method of the converter's TextModel (`_set_vocab_gpt2`) run instead of
                              the architecture's own, where that one reads a tokenizer format ours lack
                              (HunYuan's tiktoken ranks); the tensors and hyperparameters are converted as usual
  mxfp4_experts               store the experts' 3-D weights as MXFP4 blocks and scales (gpt-oss checkpoints)
  convert_args, imatrix_args  extra arguments of the converter and of llama-imatrix
  quantize                    a llama-quantize type (`Q4_K_M`): model.gguf is the conversion quantized to it by
                              `llama-quantize`, and the folder keeps no checkpoint (the goldens are the quantized
                              model's)
  rewrite                     a script beside spec.json that rewrites the conversion in place (`python <script>
                              model.gguf`), as an older converter wrote the model (DeepSeek's unsplit `attn_kv_b`);
                              the folder keeps no checkpoint (the goldens are the rewritten file's)
Read by tests/test_architectures.py only: count_tolerance (experts' token counts may differ by that share where
near-tied router scores pick another expert in llama.cpp) and median_rel_l2 (the median bound, 1e-3 by default).
The models are tiny on purpose: every byte is committed, and CI runs each one twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VOCAB_SIZE = 1024
DEFAULT_IMATRIX_ARGS = ["-c", "128", "--chunks", "4"]
IMATRIX_RETRIES = 4  # runs of llama-imatrix until its stdout came through whole
CONTROL_TOKENS = 17  # SmolLM2's special tokens come first in its vocabulary


def calibration_text() -> Path:
    shared = Path(os.environ.get("IMATRIX_SHARED", ROOT.parent / "shared"))
    return shared / "data" / "calibration.txt"


def smollm2_bpe(vocab_size: int = VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """SmolLM2's vocabulary cut to its first `vocab_size` tokens, with the merges that make them: a
    byte-level BPE that tokenizes like SmolLM2's stopped at that merge rank."""
    from imatrix.ggufio.reader import GGUFModelFile
    from imatrix.models.bundled import smollm2_path

    model_file = GGUFModelFile(smollm2_path())
    tokens = list(model_file.require("tokenizer.ggml.tokens"))[:vocab_size]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for merge in model_file.require("tokenizer.ggml.merges"):
        left, right = merge.split(" ", 1)
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    return vocab, merges


def bpe_tokenizer(spec: dict) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = smollm2_bpe(spec.get("vocab_size", VOCAB_SIZE))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = [token for token, index in vocab.items() if index < CONTROL_TOKENS]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>")
    return tokenizer


def spm_tokenizer(spec: dict, work: Path) -> transformers.PreTrainedTokenizerBase:
    import sentencepiece

    prefix = work / "spm"
    sentencepiece.SentencePieceTrainer.train(
        input=str(calibration_text()), model_prefix=str(prefix), vocab_size=spec.get("vocab_size", VOCAB_SIZE),
        model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, split_digits=True,
        bos_id=2, eos_id=1, unk_id=3, pad_id=0, bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>",
        max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
        # llama.cpp normalizes no SentencePiece text; without a normalizer the model file is 10x smaller too
        normalization_rule_name="identity", minloglevel=2)
    source = work / "spm-source"
    source.mkdir()
    shutil.copy(f"{prefix}.model", source / "tokenizer.model")
    # transformers 5 builds its fast tokenizer from a tokenizer.model only through from_pretrained
    tokenizer_class = getattr(transformers, spec.get("tokenizer_class", "LlamaTokenizer"))
    # the saved tokenizer.json follows `add_prefix_space` only when the tokenizer is built with it (ERNIE 4.5's is off)
    prefix_space = {key: value for key, value in spec.get("tokenizer_config", {}).items() if key == "add_prefix_space"}
    return tokenizer_class.from_pretrained(source, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                           pad_token="<pad>", **prefix_space)


def write_tokenizer(spec: dict, hf_dir: Path, work: Path) -> transformers.PreTrainedTokenizerBase:
    kind = spec.get("tokenizer", "bpe")
    tokenizer = bpe_tokenizer(spec) if kind == "bpe" else spm_tokenizer(spec, work)
    extra = spec.get("extra_special_tokens", [])
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.save_pretrained(hf_dir)
    if kind == "spm" and spec.get("spm_model", True):
        shutil.copy(work / "spm.model", hf_dir / "tokenizer.model")
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update({"add_bos_token": bool(spec.get("add_bos", False)), "add_eos_token": False},
                  **spec.get("tokenizer_config", {}))
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def write_checkpoint(spec: dict, hf_dir: Path, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    config_class = getattr(transformers, spec["config_class"])
    text = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "initializer_range": spec.get("init_std", 0.1)}
    settings = spec["config"]
    if "text_config" in settings:  # a multimodal checkpoint: the vocabulary is its text model's
        settings = {**settings, "text_config": {**settings["text_config"], **text},
                    "initializer_range": text["initializer_range"]}
        text = {}
    config = config_class(**settings, **text)
    torch.manual_seed(spec.get("seed", 0))
    model = getattr(transformers, spec["model_class"])(config)
    perturbed = tuple(spec.get("perturb", ()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # experts' biases are `<weight>_bias` (gpt-oss), zero at init
            if ((param.dim() == 1 and ("norm" in name or name.endswith(".bias"))) or name.endswith("_bias")
                    or name.endswith(perturbed)):
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            # routers' expert-selection biases, zero at init, are buffers in most models
            if name.endswith(("e_score_correction_bias", *perturbed)):
                buffer.add_(0.1 * torch.randn_like(buffer))
    model.to(torch.float16).save_pretrained(hf_dir)
    if spec.get("hf_config"):
        config_path = hf_dir / "config.json"
        config = {**json.loads(config_path.read_text()), **spec["hf_config"]}
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    if spec.get("mxfp4_experts"):
        store_experts_as_mxfp4(hf_dir)


# e2m1 values of the 4-bit codes, as transformers' MXFP4 checkpoints index them
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def store_experts_as_mxfp4(hf_dir: Path) -> None:
    """Rewrite the experts' 3-D weights as MXFP4 `_blocks`/`_scales`, as gpt-oss checkpoints are published:
    transformers dequantizes them on loading, llama.cpp's converter copies them into the GGUF as MXFP4."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    for name in [name for name in tensors if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        # stored [E, n_in, n_out]; quantized along n_in, one row per output
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = mxfp4(tensors.pop(name).float().transpose(1, 2))
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., n]` -> blocks `[..., n/32, 16]` (two codes a byte, the even value in the low nibble) and
    scales `[..., n/32]` (power-of-two exponents + 127): each group of 32 scaled so its largest value fits."""
    groups = rows.reshape(*rows.shape[:-1], -1, 32)
    largest = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(largest / 6.0))
    codes = (groups / torch.exp2(exponent)).unsqueeze(-1).sub(FP4_VALUES).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent.squeeze(-1) + 127).to(torch.uint8)


# Our tiny vocabularies are no model's, so the converter cannot recognise them by hash; the pre-tokenizer
# is the one they were cut from (SmolLM2's), stated as the converter would state it.
CONVERTER = """
import runpy, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/gguf-py")
import conversion, conversion.base
pre, vocab, script = sys.argv[2], sys.argv[3], sys.argv[1] + "/convert_hf_to_gguf.py"
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
if vocab:
    find_model_class = conversion.get_model_class
    def get_model_class(*args, **kwargs):
        model_class = find_model_class(*args, **kwargs)
        model_class.set_vocab = getattr(conversion.base.TextModel, vocab)
        return model_class
    conversion.get_model_class = get_model_class
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


def convert(spec: dict, hf_dir: Path, gguf_path: Path, llama_cpp: Path) -> None:
    args = [str(hf_dir), "--outfile", str(gguf_path), "--outtype", "f16", *spec.get("convert_args", [])]
    run([sys.executable, "-c", CONVERTER, str(llama_cpp), spec.get("pre", "smollm"), spec.get("converter_vocab", ""),
         *args])


def run_imatrix(spec: dict, folder: Path, bin_dir: Path) -> None:
    args = spec.get("imatrix_args", DEFAULT_IMATRIX_ARGS)
    command = [str(bin_dir / "llama-imatrix"), "-m", str(folder / "model.gguf"), "-f", str(calibration_text()),
               "-o", str(folder / "imatrix.gguf"), "-t", "2", *args]
    result = run(command)
    for _ in range(IMATRIX_RETRIES):
        if "Final estimate" in result.stdout:
            break
        # llama.cpp's logger is never flushed at exit (common/log.cpp leaks it): the last lines may be lost
        result = run(command)
    (folder / "ppl.txt").write_text(result.stdout)
    (folder / "imatrix.log").write_text(" ".join(["llama-imatrix", *command[1:]]) + "\n" + result.stderr)


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}")
    return result


def quantize(gguf_path: Path, quant_type: str, bin_dir: Path) -> None:
    quantized = gguf_path.with_suffix(".quantized.gguf")
    run([str(bin_dir / "llama-quantize"), str(gguf_path), str(quantized), quant_type])
    quantized.replace(gguf_path)


def generate(folder: Path, llama_cpp: Path, bin_dir: Path) -> None:
    spec = json.loads((folder / "spec.json").read_text())
    shutil.rmtree(folder / "hf", ignore_errors=True)
    with tempfile.TemporaryDirectory() as work:
        keeps_checkpoint = not (spec.get("quantize") or spec.get("rewrite"))
        hf_dir = folder / "hf" if keeps_checkpoint else Path(work) / "hf"
        hf_dir.mkdir()
        tokenizer = write_tokenizer(spec, hf_dir, Path(work))
        write_checkpoint(spec, hf_dir, tokenizer)
        convert(spec, hf_dir, folder / "model.gguf", llama_cpp)
    if spec.get("rewrite"):
        run([sys.executable, str(folder / spec["rewrite"]), str(folder / "model.gguf")])
    if spec.get("quantize"):
        quantize(folder / "model.gguf", spec["quantize"], bin_dir)
    run_imatrix(spec, folder, bin_dir)
    print(f"{folder.name}: {sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 1e6:.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source (convert_hf_to_gguf.py)")
    parser.add_argument("--bin", type=Path, required=True, help="folder with llama-imatrix")
    parser.add_argument("names", nargs="*", help="architectures to regenerate (default: all)")
    args = parser.parse_args()
    folders = [HERE / name for name in args.names] or sorted(p.parent for p in HERE.glob("*/spec.json"))
    for folder in folders:
        generate(folder, args.llama_cpp, args.bin)


if __name__ == "__main__":
    main()
