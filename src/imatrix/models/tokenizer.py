"""Tokenizers built straight from GGUF vocab metadata, matching llama.cpp's tokenization.

Byte-level BPE (`gpt2`) vocabularies are built here from the stored vocab and merges with the
pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (well under a second for 49k tokens);
SentencePiece ones (`llama`, `gemma4`) by transformers' GGUF tokenizer builders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile

# llama.cpp's `llama_vocab::impl::load` regexes, keyed by `tokenizer.ggml.pre`
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGITS_THEN_GPT2 = ("digits", GPT2_REGEX)
PRE_TOKENIZERS: dict[str, tuple[str | None, str]] = {
    "gpt-2": (None, GPT2_REGEX),
    "gpt2": (None, GPT2_REGEX),
    "smollm": DIGITS_THEN_GPT2,
    "starcoder": DIGITS_THEN_GPT2,
    "refact": DIGITS_THEN_GPT2,
    "codeshell": DIGITS_THEN_GPT2,
    "llama3": (None, LLAMA3_REGEX),
    "llama-bpe": (None, LLAMA3_REGEX),
    "qwen2": (None, QWEN2_REGEX),
    "qwen35": (None, QWEN35_REGEX),
}
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class TextTokenizer(Protocol):
    bos_id: int | None
    add_bos: bool

    def encode(self, text: str, parse_special: bool = False) -> list[int]: ...


@dataclass
class GGUFTokenizer:
    tokenizer: Tokenizer
    bos_id: int | None
    add_bos: bool

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Like llama.cpp's `common_tokenize(text, add_special=true, parse_special)`."""
        self.tokenizer.encode_special_tokens = not parse_special
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids


def tokenizer_from_gguf(model_file: GGUFModelFile) -> GGUFTokenizer:
    kind = model_file.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(model_file)
    elif kind in SENTENCEPIECE_KINDS:
        tokenizer = _sentencepiece(model_file, kind)
    else:
        raise ImatrixError(f"{model_file.path}: tokenizer '{kind}' is not supported (supported: gpt2, "
                           f"{', '.join(SENTENCEPIECE_KINDS)})")
    bos_id = model_file.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(model_file.get("tokenizer.ggml.add_bos_token", kind in SENTENCEPIECE_KINDS))
    return GGUFTokenizer(tokenizer, None if bos_id is None else int(bos_id), add_bos)


def _byte_level_bpe(model_file: GGUFModelFile) -> Tokenizer:
    pre = model_file.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ImatrixError(f"{model_file.path}: pre-tokenizer '{pre}' is not supported "
                           f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens: list[str] = list(model_file.require("tokenizer.ggml.tokens"))
    merges = [tuple(merge.split(" ", 1)) for merge in model_file.require("tokenizer.ggml.merges")]
    try:
        bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False)
    except Exception as exc:  # noqa: BLE001 - `tokenizers` raises plain Exceptions for a bad vocab
        raise ImatrixError(f"{model_file.path}: cannot build its tokenizer: {exc}") from exc
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(*PRE_TOKENIZERS[pre])
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, list(model_file.get("tokenizer.ggml.token_type", [])))
    return tokenizer


# `tokenizer.ggml.model` values of SentencePiece-style vocabularies (scores, no byte-level alphabet)
SENTENCEPIECE_KINDS = ("llama", "gemma4")


def _sentencepiece(model_file: GGUFModelFile, kind: str) -> Tokenizer:
    """transformers' builder for the file's vocabulary (its Gemma and Phi-3 variants included)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = {"tokenizer_type": kind, "pre_tokenizer_type": model_file.get("tokenizer.ggml.pre"),
              "tokens": list(model_file.require("tokenizer.ggml.tokens")),
              "scores": list(model_file.get("tokenizer.ggml.scores") or []),
              "token_type": list(model_file.get("tokenizer.ggml.token_type") or [])}
    if model_file.get("tokenizer.ggml.merges"):
        fields["merges"] = list(model_file.get("tokenizer.ggml.merges"))
    try:
        tokenizer, _ = convert_gguf_tokenizer(model_file.architecture, fields)
    except Exception as exc:  # noqa: BLE001 - the builders raise what `tokenizers` raises
        raise ImatrixError(f"{model_file.path}: cannot build its tokenizer: {exc}") from exc
    if kind == "llama" and not model_file.get("tokenizer.ggml.add_space_prefix", True):
        _no_space_prefix(tokenizer)
    return tokenizer


def _no_space_prefix(tokenizer: Tokenizer) -> None:
    """llama.cpp prepends '▁' to SentencePiece text only with `tokenizer.ggml.add_space_prefix` (default on)."""
    pre = tokenizer.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace):
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="never",
                                                           split=pre.split)


def _pre_tokenizer(first: str | None, regex: str) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if first == "digits":
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    # llama.cpp matches user-defined tokens always, control tokens only with parse_special
    added = [
        AddedToken(tokens[i], special=kind == TOKEN_TYPE_CONTROL, normalized=False)
        for i, kind in enumerate(token_types)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    if added:
        tokenizer.add_tokens(added)
