"""Special tokens: which tokens llama.cpp matches in the raw text before tokenizing, and how.

The file's token types say it first (control, user-defined, unknown); `llama_vocab::impl::load` then
changes some by their text: end-of-generation and fill-in-the-middle tokens become control tokens,
a few of gpt-oss's become user-defined, Gemma 4's `</s>` a normal one. Control and unknown tokens are
matched only when special tokens are parsed, user-defined ones always; the longest first
(`tokenizer_st_partition`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class Attr:
    """llama.cpp's `llama_token_attr` bits that matter here (plain ints: a vocabulary has 10^5 of them)."""

    NONE = 0
    UNKNOWN = 1 << 0
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


# `tokenizer.ggml.token_type` values (gguf-py's TokenType)
TYPE_ATTRS = {1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL, 4: Attr.USER_DEFINED}

END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
                     "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
                     "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
                     "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[")
# fill-in-the-middle tokens, found by text where the file names none of their group
FILL_IN_THE_MIDDLE = {
    ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"): (
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
        "<|code_prefix|>", "<|prefix|>"),
    ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"): (
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
        "<|code_suffix|>", "<|suffix|>"),
    ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"): (
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
        "<|code_middle|>", "<|middle|>"),
    ("tokenizer.ggml.fim_pad_token_id",): ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ("tokenizer.ggml.fim_rep_token_id",): ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("tokenizer.ggml.fim_sep_token_id",): ("<|file_sep|>",),
}
ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss
C_SPACES = " \t\n\v\f\r"  # C's isspace, for the strip attributes
MANY_SPECIALS = 64


@dataclass(frozen=True)
class SpecialToken:
    id: int
    text: str
    parsed_only: bool  # matched only when special tokens are parsed (control and unknown tokens)
    lstrip: bool
    rstrip: bool


def special_tokens(tokens: Sequence[str], vocab: dict[str, int], token_types: Sequence[int] | None,
                   get: Callable[[str], Any]) -> list[SpecialToken]:
    """The tokens llama.cpp matches in raw text, longest first. `vocab` maps a text to its id;
    `get` reads the file's metadata."""
    n_tokens = len(tokens)
    attrs = ([TYPE_ATTRS.get(kind, Attr.NONE) for kind in token_types[:n_tokens]] if token_types
             else [Attr.NORMAL] * n_tokens)

    def mark(text: str, attr: int, replace: bool = False) -> None:
        if text in vocab:
            index = vocab[text]
            attrs[index] = attr if replace else attrs[index] | attr

    for keys, texts in FILL_IN_THE_MIDDLE.items():
        if not any(_in_range(get(key), n_tokens) for key in keys):
            for text in texts:
                mark(text, Attr.CONTROL)
    for text in END_OF_GENERATION:
        mark(text, Attr.CONTROL)
    for text in ALWAYS_USER_DEFINED:
        mark(text, Attr.USER_DEFINED, replace=True)
    # o200k_harmony and solar-open: their `<|end|>` ends no generation
    calls = "<|call|>" in vocab or "<|calls|>" in vocab
    if "<|end|>" in vocab and calls and ("<|return|>" in vocab or "<|flush|>" in vocab):
        mark("<|end|>", Attr.USER_DEFINED, replace=True)
    if "<|tool_response>" in vocab:
        mark("</s>", Attr.NORMAL, replace=True)  # Gemma 4's is a plain token
    special = [index for index, attr in enumerate(attrs)
               if attr & (Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN)]
    _set_strips(attrs, special, vocab, get)
    special.sort(key=lambda index: -len(tokens[index].encode("utf-8")))
    return [SpecialToken(index, tokens[index], bool(attrs[index] & (Attr.CONTROL | Attr.UNKNOWN)),
                         bool(attrs[index] & Attr.LSTRIP), bool(attrs[index] & Attr.RSTRIP)) for index in special]


def _in_range(token_id: Any, n_tokens: int) -> bool:
    return token_id is not None and 0 <= int(token_id) < n_tokens


def _set_strips(attrs: list[int], special: list[int], vocab: dict[str, int], get: Callable[[str], Any]) -> None:
    """Per-model strip attributes, by the file's model name, pre-tokenizer and architecture."""
    name = str(get("general.name") or "").lower()
    pre, architecture = str(get("tokenizer.ggml.pre") or ""), str(get("general.architecture") or "")
    if any(key in pre for key in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(key in architecture for key in ("nomic-bert-moe", "jina-bert-v3")):
        _strip(attrs, vocab, "<mask>", Attr.LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for index in special:
            attrs[index] |= Attr.RSTRIP
        _strip(attrs, vocab, "</s>", Attr.RSTRIP, True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            _strip(attrs, vocab, text, Attr.RSTRIP, False)
    elif "modern-bert" in name:
        _strip(attrs, vocab, "[MASK]", Attr.LSTRIP, True)


def _strip(attrs: list[int], vocab: dict[str, int], text: str, attr: int, value: bool) -> None:
    if text in vocab:
        index = vocab[text]
        attrs[index] = attrs[index] | attr if value else attrs[index] & ~attr


def partition(text: str, specials: Sequence[SpecialToken], parse_special: bool) -> list[str | int]:
    """`text` as raw pieces and special token ids, each special token cut out of every piece in turn."""
    pieces: list[str | int] = [text] if text else []
    # many special tokens (Gemma's thousands): those whose first three characters never occur are passed over
    present = {text[at:at + 3] for at in range(len(text) - 2)} if len(specials) > MANY_SPECIALS else None
    for special in specials:
        if special.parsed_only and not parse_special:
            continue
        if present is not None and len(special.text) >= 3 and special.text[:3] not in present:
            continue
        pieces = [part for piece in pieces
                  for part in (_cut_out(piece, special) if isinstance(piece, str) else (piece,))]
    return pieces


def _cut_out(piece: str, special: SpecialToken) -> list[str | int]:
    if special.text not in piece:
        return [piece]
    parts: list[str | int] = []
    rest = piece
    while (at := rest.find(special.text)) >= 0:
        left = rest[:at].rstrip(C_SPACES) if special.lstrip else rest[:at]
        parts.extend([left, special.id] if left else [special.id])
        rest = rest[at + len(special.text):]
        if special.rstrip:
            rest = rest.lstrip(C_SPACES)
    if rest:
        parts.append(rest)
    return parts
