"""The vocabularies and texts the tokenizer goldens cover (shared by `generate.py` and the test).

A case is a vocabulary (the bundled SmolLM2's, or one of `vocabs/*.gguf`) with some of its metadata
changed: another `tokenizer.ggml.pre`, other token types, tokens added at the end, the vocabulary cut.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VOCABS = HERE / "vocabs"
GOLDENS = HERE / "goldens.json"
SMOLLM2 = "smollm2"

# control, user-defined, normal (`tokenizer.ggml.token_type`); llama.cpp wants every token's text unique
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1


@dataclass(frozen=True)
class Case:
    vocab: str  # SMOLLM2 or a file in vocabs/
    metadata: dict[str, Any] = field(default_factory=dict)  # keys set; None removes one
    token_types: dict[str, int] = field(default_factory=dict)  # new types of tokens, by text
    added: tuple[tuple[str, int], ...] = ()  # tokens (text, type) put after the last one
    n_tokens: int | None = None  # the vocabulary cut to its first tokens (the merges left whole)


# one `tokenizer.ggml.pre` of each llama.cpp pre-tokenizer type, and the names that set more than the type
# ("whitespace" is left out: llama.cpp asserts on its spaces with any vocabulary but its own tokenizer's)
PRE_NAMES = (
    "afmoe", "bailingmoe", "bloom", "chameleon", "chatglm-bpe", "dbrx", "deepseek-coder", "deepseek-llm",
    "deepseek-v3", "default", "exaone-moe", "falcon", "gemma4", "glm4", "gpt-2", "gpt-4o",
    "granite-embed-multi-311m", "granite-embed-multi-97m", "jais-2", "kimi-k2", "laguna", "llama-bpe", "llama3",
    "minicpm5", "qwen2", "qwen35", "sarvam-moe", "seed-coder", "spark2_5", "starcoder", "superbpe", "tekken",
    "tiny_aya", "ufakzeka", "viking", "youtu",
)
# SmolLM2 says it adds no BOS; dropping that shows each pre-tokenizer's default
CASES: dict[str, Case] = {
    **{f"pre-{name}": Case(SMOLLM2, {"tokenizer.ggml.pre": name, "tokenizer.ggml.add_bos_token": None})
       for name in PRE_NAMES},
    "smollm2": Case(SMOLLM2),
    # specials of other vocabularies: llama.cpp turns end-of-generation and fill-in-the-middle tokens into
    # control tokens, gpt-oss's <|channel|> into a user-defined one, Gemma 4's </s> into a normal one
    "smollm2-specials": Case(
        SMOLLM2, {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True},
        token_types={"<|im_end|>": USER_DEFINED, "<|im_start|>": USER_DEFINED, "<filename>": USER_DEFINED,
                     "<reponame>": USER_DEFINED, "<jupyter_code>": 2},
        added=(("<|channel|>", CONTROL), ("<|end|>", CONTROL), ("<|return|>", CONTROL), ("<|call|>", CONTROL),
               ("<think>", USER_DEFINED), ("<PRE>", NORMAL), ("<|tool_response>", NORMAL), ("</s>", CONTROL),
               ("<eos>", NORMAL), ("qxy", USER_DEFINED), ("xyzq", USER_DEFINED))),
    # merges whose tokens are cut off: llama.cpp still merges, then spells what is no token byte by byte
    "smollm2-cut": Case(SMOLLM2, n_tokens=3000),
    "spm-bpe": Case("spm-bpe.gguf"),
    "spm-bpe-no-prefix": Case("spm-bpe.gguf", {"tokenizer.ggml.add_space_prefix": False,
                                                "tokenizer.ggml.add_bos_token": False}),
    "spm-unigram": Case("spm-unigram.gguf"),
    # Phi-3: its special tokens eat the whitespace after them (llama.cpp wants <|endoftext|> there)
    "spm-phi3": Case("spm-bpe.gguf", {"general.name": "Phi-3 mini test", "tokenizer.ggml.add_eos_token": True},
                     added=(("<|endoftext|>", CONTROL),)),
    "gemma4": Case("gemma4.gguf"),
}

SPECIALS_TEXT = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi <|endoftext|>there<|im_end|>\n"
    "<fim_prefix>def f():<fim_suffix>\n<fim_middle>pass<jupyter_code>x<filename>y<reponame>w<repo_name>"
    "<|channel|>z<|end|> <|return|>"
    "<|call|><think>a</think><PRE> pre <|tool_response></s><eos> qxyzq xyzqxy <s>x</s><unk> <|user|>  hi <|end|>\n"
    "   after<|system|>\n\n<tool>\t\t<bos><pad>"
)
EDGE_TEXT = (
    "Hello world! It's a test. I'M SURE YOU'LL SEE; we've they'd I'd don't DON'T O'Neil rock'n'roll\n"
    "  leading spaces, trailing spaces   \n\ttabs\tin\t\ttext\r\nCRLF line\r\n\r\nblank lines\n\n\n"
    "digits: 1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 2024-05-09 0x1F \u00bd \u00b2 \u0969\u096a\u096b "
    "\u0663\u0664 \u216b\n"
    "\u00dcn\u00efc\u00f6d\u00e9 fa\u00e7ade na\u00efve co\u00f6perate Stra\u00dfe \u00c6\u00d8\u00c5 "
    "\u00e6\u00f8\u00e5 \u0130stanbul \u01c5 \u00df \ufb01 \uff21\uff42\uff43\uff11\uff12\uff13\n"
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937\u0924\u094d\u0930\u093f\u092f \u0939\u093f\u0928\u094d"
    "\u0926\u0940 \u0ba4\u0bae\u0bbf\u0bb4\u0bcd \u0e44\u0e17\u0e22 \u09ac\u09be\u0982\u09b2\u09be\n"
    "CJK: \u4f60\u597d\u4e16\u754c\uff0c\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad"
    "\u30b9\u30c8\u3001\u30ab\u30bf\u30ab\u30ca\u3002\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4. "
    "\U00020000\U0002a6a5\n"
    "emoji: \U0001f600 \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1fa\U0001f1f8 "
    "\u2764\ufe0f \u2728\n"
    "Greek \u03a9\u03bc\u03ad\u03b3\u03b1, Cyrillic \u041f\u0440\u0438\u0432\u0435\u0442, Arabic \u0645\u0631\u062d"
    "\u0628\u0627, Hebrew \u05e9\u05dc\u05d5\u05dd\n"
    "code: def f(x): return x**2 + 1  # comment\n    if (a && b || c) { x += 1; } // ok\n"
    "punct: ... !!! ??? --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} <<< >>> ||| ~~~ ``` '''\n"
    "mixed: CamelCaseWord snake_case_word kebab-case-word HTTPServer XMLHttpRequest iPhone eBay\n"
    "spaces:  two   three    four     five\u00a0nbsp\u2003emsp\u3000ideographic \u200bzwsp\n"
    "URL https://example.com/path?q=1&r=2#frag email@example.com\n"
    "\u0085nel\u2028ls\u2029ps\x0bvt\x0cff \x01\x1c\x7f \u0378\ue000 end  \n   "
)
FUZZ_POOLS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "'sStTmMdDrReEvVlL", " ", "  ", "\t",
    "\n", "\r\n", "\r", "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~", "'", "\u00e9\u00e0\u00fc\u00df\u00f8\u0153\u00c9\u00c6",
    "\u03b1\u03b2\u03b3\u03a9\u03a3", "\u0430\u0431\u0432\u0416\u0417", "\u4f60\u597d\u4e16\u754c\u4e2d\u6587",
    "\ud55c\uad6d\uc5b4", "\u3072\u3089\u30ab\u30bf", "\u0301\u0308\u0303\u093f\u094d",
    "\u00bd\u00b2\u216b\u0663\u0969",
    "\U0001f600\U0001f44d\U0001f3fd\u2764\u2728", "\u200d\ufe0f", "\u00a0\u3000\u2003\u2028\u2029\u0085\x0b\x0c",
    "\x01\x1c\x1f\x7f", "\u0378\ue000\U000e0080", "\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c\u201c\u2019\u2014",
    "\u01c5\u01c8", "\ufb01\ufb02", "\uff21\uff42\uff11", "\U00020000\U0001d49c", "\u0627\u0644\u0639", "\u0e44\u0e17",
    "<sentinel:12>", "IMGIMGABZ", "    ",
)


def fuzz_text(n_chars: int, seed: int) -> str:
    """Runs drawn from many kinds of characters: letters of many scripts and cases, marks, digits and other
    numbers, punctuation, symbols, emoji, every kind of whitespace, controls, unassigned code points."""
    rng = random.Random(seed)
    pieces, size = [], 0
    while size < n_chars:
        pool = rng.choice(FUZZ_POOLS)
        length = rng.choice((1, 1, 1, 2, 3, 5, 8))
        piece = "".join(rng.choice(pool) for _ in range(length)) if rng.random() < 0.7 else pool[:2 * length]
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def texts(shared_data: Path) -> dict[str, str]:
    """name -> text; the shared calibration and evaluation texts are read as llama-tokenize reads a file."""
    return {"edge": EDGE_TEXT + SPECIALS_TEXT,
            **{f"fuzz{seed}": fuzz_text(6000, seed) for seed in range(3)},
            "calibration": (shared_data / "calibration.txt").read_bytes().decode("utf-8"),
            "eval": (shared_data / "eval.txt").read_bytes().decode("utf-8")}


# the texts whose whole token ids are stored; the others by count and digest
STORED_WHOLE = ("edge",)


def metadata(case: Case, base: dict[str, Any]) -> dict[str, Any]:
    """The case's vocabulary metadata, from its base vocabulary's."""
    changed = dict(base)
    tokens = list(changed["tokenizer.ggml.tokens"])
    types = list(changed.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    scores = changed.get("tokenizer.ggml.scores")
    if case.n_tokens is not None:
        tokens, types = tokens[:case.n_tokens], types[:case.n_tokens]
        scores = scores[:case.n_tokens] if scores else scores
    index = {text: position for position, text in enumerate(tokens)}
    for text, kind in case.token_types.items():
        types[index[text]] = kind
    for text, kind in case.added:
        tokens.append(text)
        types.append(kind)
        scores = [*scores, -1000.0] if scores else scores
    changed.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types})
    if scores is not None:
        changed["tokenizer.ggml.scores"] = scores
    for key, value in case.metadata.items():
        if value is None:
            changed.pop(key, None)
        else:
            changed[key] = value
    return changed
