"""Our GGUF tokenizer against llama.cpp's own (`llama-tokenize`), on every kind of vocabulary it reads.

Each case of `tokenizer/tokenizer_cases.py` is a vocabulary: SmolLM2's under each of llama.cpp's pre-tokenizers,
with other special tokens, cut short; SentencePiece ones (BPE and unigram, with and without a space
prefix, Phi-3's); a Gemma 4 one. Its token ids for a text of edge cases (with and without special
tokens parsed), for random mixtures of every kind of character, and for the calibration and evaluation
texts must be llama.cpp's (`tokenizer/goldens.json`, written by `tokenizer/generate.py`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.tokenization import unicode
from imatrix.models.tokenization.pretokenizers import pre_tokenizer as named_pre_tokenizer
from imatrix.models.tokenization.splitting import split_words
from imatrix.models.tokenizer import tokenizer_from_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent / "tokenizer"))
from tokenizer_cases import CASES, GOLDENS, SMOLLM2, VOCABS, metadata, texts  # noqa: E402


@dataclass
class VocabFile:
    """A vocabulary's metadata, as `tokenizer_from_gguf` reads a file."""

    path: Path
    fields: dict[str, Any]
    architecture: str = "llama"

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        return self.fields[key]


@pytest.fixture(scope="module")
def goldens() -> dict[str, dict[str, Any]]:
    return json.loads(GOLDENS.read_text())


@pytest.fixture(scope="module")
def inputs(eval_text: Path) -> dict[str, str]:
    return texts(eval_text.parent)


@pytest.fixture(scope="module")
def base_metadata(smollm2_q4_1: Path) -> dict[str, dict[str, Any]]:
    files = {SMOLLM2: smollm2_q4_1, **{path.name: path for path in VOCABS.glob("*.gguf")}}
    return {name: GGUFModelFile(path).metadata for name, path in files.items()}


def first_difference(ours: list[int], theirs: list[int]) -> str:
    at = next((index for index, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
              min(len(ours), len(theirs)))
    return f"first difference at {at} of {len(theirs)}: ours {ours[at:at + 8]}, llama.cpp's {theirs[at:at + 8]}"


@pytest.mark.parametrize("name", list(CASES))
def test_tokenizes_as_llama_cpp(name: str, goldens: dict, inputs: dict[str, str], base_metadata: dict) -> None:
    case = CASES[name]
    tokenizer = tokenizer_from_gguf(VocabFile(Path(name), metadata(case, base_metadata[case.vocab])))
    for text_name, expected in goldens[name].items():
        parse_special = text_name.endswith("+special")
        ids = tokenizer.encode(inputs[text_name.removesuffix("+special")], parse_special=parse_special)
        if "ids" in expected:
            assert ids == expected["ids"], f"{text_name}: {first_difference(ids, expected['ids'])}"
        else:
            found = (len(ids), hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest())
            assert found == (expected["n"], expected["sha256"]), f"{text_name}: {len(ids)} tokens, not llama.cpp's"


def test_every_case_has_goldens(goldens: dict) -> None:
    assert sorted(goldens) == sorted(CASES)


def test_unicode_classes_are_unicode_15_1() -> None:
    # U+0CF3 came with Unicode 15.0, U+2FFC with 15.1 (Python 3.11's own tables are 14.0); U+0897 with 16.0
    assert [unicode.category(code) for code in (0x41, 0x0CF3, 0x2FFC, 0x0897, 0xBD, 0x301, 0x20AC)] == \
        ["L", "M", "S", None, "N", "M", "S"]
    assert unicode.folded("a\u00e9\u00bd\u0301\u00a0\u3000\u0378!") == "a\xd2\xd1\xd4\x0b\x0b\xd0!"


def test_digit_groups_keep_the_text_before_a_run() -> None:
    # llama.cpp's AFMoE splitter: a run cut in threes from the right, the first group joined to what precedes it
    afmoe = named_pre_tokenizer("afmoe")
    assert split_words("ab1234567 cd 12", afmoe.splits[:1]) == ["ab1", "234", "567", " cd 12"]
