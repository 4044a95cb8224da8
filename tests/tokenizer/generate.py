"""Regenerate the tokenizer goldens: the token ids llama.cpp's `llama-tokenize` gives for every case of
`tokenizer_cases.py` on every text (`goldens.json`), and, with --vocabs, the test vocabularies in `vocabs/`.

    python tests/tokenizer/generate.py --bin <llama.cpp build/bin> [--vocabs]

llama.cpp is the one `tests/architectures/generate.py` names. --vocabs needs `sentencepiece`: it trains
two SentencePiece vocabularies (BPE and unigram) on the calibration text and makes a Gemma 4 style BPE
vocabulary from the first. A case's vocabulary is written as a GGUF file holding nothing but metadata
(llama-tokenize reads no weights).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_cases import CASES, GOLDENS, SMOLLM2, STORED_WHOLE, VOCABS, metadata, texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("IMATRIX_SHARED", ROOT.parent / "shared"))
# the llama hyperparameters a vocabulary-only file needs to load
LLAMA_KEYS = {"llama.context_length": 512, "llama.embedding_length": 64, "llama.block_count": 1,
              "llama.feed_forward_length": 128, "llama.attention.head_count": 1,
              "llama.attention.layer_norm_rms_epsilon": 1e-5}


def base_metadata(vocab: str) -> dict[str, Any]:
    """The tokenizer metadata of a case's vocabulary (and the model name llama.cpp reads for Phi-3)."""
    from imatrix.ggufio.reader import GGUFModelFile
    from imatrix.models.bundled import smollm2_path

    model_file = GGUFModelFile(smollm2_path() if vocab == SMOLLM2 else VOCABS / vocab)
    return {key: value for key, value in model_file.metadata.items()
            if key.startswith("tokenizer.ggml.") or key == "general.name"}


def write_gguf(path: Path, fields: dict[str, Any]) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {**LLAMA_KEYS, **fields}.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key == "tokenizer.ggml.scores":
            writer.add_array(key, [float(score) for score in value])
        else:
            writer.add_array(key, list(value))
    # one tensor, as every model file has one
    writer.add_tensor("placeholder", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_tokenize(binaries: Path, model: Path, text: str, parse_special: bool) -> list[int]:
    with tempfile.NamedTemporaryFile(suffix=".txt") as prompt:
        prompt.write(text.encode("utf-8"))
        prompt.flush()
        command = [str(binaries / "llama-tokenize"), "-m", str(model), "-f", prompt.name, "--ids", "--log-disable",
                   "--no-escape"] + ([] if parse_special else ["--no-parse-special"])
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "LD_LIBRARY_PATH": str(binaries)})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def digest(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def golden(ids: list[int], whole: bool) -> dict[str, Any]:
    return {"ids": ids} if whole else {"n": len(ids), "sha256": digest(ids)}


def make_goldens(binaries: Path) -> None:
    inputs = texts(SHARED / "data")
    goldens: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        for name, case in CASES.items():
            model = Path(work) / f"{name}.gguf"
            write_gguf(model, metadata(case, base_metadata(case.vocab)))
            goldens[name] = {}
            for text_name, text in inputs.items():
                whole = text_name in STORED_WHOLE
                for parse_special in (False, True) if whole else (False,):
                    ids = llama_tokenize(binaries, model, text, parse_special)
                    goldens[name][text_name + ("+special" if parse_special else "")] = golden(ids, whole)
            counts = (f"{key} {len(found['ids']) if 'ids' in found else found['n']}"
                      for key, found in goldens[name].items())
            print(f"{name}: {', '.join(counts)}")
    GOLDENS.write_text(json.dumps(goldens, separators=(",", ":")) + "\n")


def train_sentencepiece(kind: str, vocab_size: int) -> bytes:
    import sentencepiece

    lines = (SHARED / "data" / "calibration.txt").read_text().splitlines()
    # indented lines too, for tokens of runs of spaces
    lines += [" " * (2 + index % 7) + line for index, line in enumerate(lines[::7])]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type=kind, vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True, num_threads=1,
        user_defined_symbols=["<|user|>", "<|end|>", "<tool>"], control_symbols=["<|system|>"], minloglevel=2)
    return model.getvalue()


def sentencepiece_vocab(model: bytes) -> dict[str, Any]:
    """The metadata llama.cpp's converter writes for a SentencePiece model, plus Gemma's whitespace tokens:
    user-defined, spelled with real spaces."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    tokens = [piece.piece for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    types = [piece.type for piece in proto.pieces]
    for text in ("  ", "   ", "    ", "\n\n", "\t\t"):
        if text in tokens:  # llama.cpp wants every token's text unique
            types[tokens.index(text)] = 4
        else:
            tokens.append(text)
            scores.append(-1000.0)
            types.append(4)
    return {"general.name": "spm test", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def gemma4_vocab(model: bytes) -> dict[str, Any]:
    """A Gemma 4 style vocabulary: BPE with merges over '▁'-spaced raw text, `<0xXX>` byte tokens,
    newline-run tokens, and Gemma 4's specials (`<|tool_response>` makes its `</s>` a normal token)."""
    from transformers.tokenization_utils_base import generate_merges

    fields = sentencepiece_vocab(model)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    for text, kind in (("\n", 1), ("\n\n", 1), ("<bos>", 3), ("<eos>", 3), ("<|tool_response>", 3), ("</s>", 3)):
        if text in tokens:
            types[tokens.index(text)] = kind
        else:
            tokens.append(text)
            types.append(kind)
            fields["tokenizer.ggml.scores"].append(0.0)
    vocab = {text: index for index, text in enumerate(tokens) if types[index] in (1, 6)}
    merges = [f"{left} {right}" for left, right in generate_merges(vocab)]
    return {**fields, "general.name": "gemma4 test", "tokenizer.ggml.model": "gemma4", "tokenizer.ggml.pre": "gemma4",
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": tokens.index("<bos>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<eos>"), "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_space_prefix": False}


def make_vocabs() -> None:
    VOCABS.mkdir(exist_ok=True)
    bpe = train_sentencepiece("bpe", 4000)
    write_gguf(VOCABS / "spm-bpe.gguf", sentencepiece_vocab(bpe))
    write_gguf(VOCABS / "spm-unigram.gguf", sentencepiece_vocab(train_sentencepiece("unigram", 3000)))
    write_gguf(VOCABS / "gemma4.gguf", gemma4_vocab(bpe))
    for path in sorted(VOCABS.glob("*.gguf")):
        print(f"{path}: {path.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin (llama-tokenize)")
    parser.add_argument("--vocabs", action="store_true", help="retrain the test vocabularies first")
    args = parser.parse_args()
    if args.vocabs:
        make_vocabs()
    make_goldens(args.bin)


if __name__ == "__main__":
    main()
