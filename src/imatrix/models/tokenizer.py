"""Tokenizers built straight from GGUF vocab metadata, tokenizing exactly as llama.cpp does.

`tokenizer.ggml.model` says which:
  gpt2     byte-level BPE, cut into words first by the pre-tokenizer `tokenizer.ggml.pre` names
  gemma4   BPE on raw UTF-8 with spaces as '▁' (Gemma 4)
  llama    SentencePiece, merged by token score
Special tokens are cut out of the text before (`tokenization/special.py`); BOS and EOS are added as
the file (or llama.cpp's default for its kind of vocabulary) says. SmolLM2's 49k vocabulary builds
in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from imatrix.errors import ImatrixError
from imatrix.models.tokenization.bpe import BytePairEncoder
from imatrix.models.tokenization.pretokenizers import PreTokenizer, pre_tokenizer
from imatrix.models.tokenization.sentencepiece import SentencePieceEncoder
from imatrix.models.tokenization.special import SpecialToken, partition, special_tokens

# llama.cpp's default BOS and EOS ids per `tokenizer.ggml.model` (the file's own ids win)
DEFAULT_BOS_EOS = {"gpt2": (11, 11), "gemma4": (None, None), "llama": (1, 2)}


class TextTokenizer(Protocol):
    bos_id: int | None
    add_bos: bool

    def encode(self, text: str, parse_special: bool = False) -> list[int]: ...


class VocabularyFile(Protocol):
    """What is read of a GGUF file: a `GGUFModelFile`, or (in tests) metadata of its own."""

    path: Path
    architecture: str

    def get(self, key: str, default: Any = None) -> Any: ...

    def require(self, key: str) -> Any: ...


class FragmentEncoder(Protocol):
    def encode(self, text: str, after_special: bool) -> list[int]: ...


@dataclass
class GGUFTokenizer:
    # builds the encoder on first use: a collection that gets its tokens elsewhere (`pipeline.tokens_ahead`)
    # never pays for it (SmolLM2's 49k-token BPE: 0.1 s)
    build_encoder: Callable[[], FragmentEncoder] = field(repr=False)
    specials: list[SpecialToken]
    bos_id: int | None
    add_bos: bool
    eos_id: int | None = None
    add_eos: bool = False
    fields: dict[str, Any] = field(default_factory=dict, repr=False)  # for `tokenizer`

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Like llama.cpp's `common_tokenize(text, add_special=true, parse_special)`."""
        ids = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        after_special = True
        for piece in partition(text, self.specials, parse_special):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self.encoder.encode(piece, after_special))
            after_special = isinstance(piece, int)
        if self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @cached_property
    def encoder(self) -> FragmentEncoder:
        return self.build_encoder()

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The same vocabulary as transformers builds it from a GGUF file: for decoding, and for saving
        in Hugging Face form. (`encode` does not use it: its splitting is not always llama.cpp's.)"""
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

        fields = {key: value for key, value in self.fields.items() if key != "architecture" and value is not None}
        try:
            tokenizer, _ = convert_gguf_tokenizer(self.fields["architecture"], fields)
        except Exception as exc:  # noqa: BLE001 - the builders raise what `tokenizers` raises
            raise ImatrixError(f"transformers cannot build this vocabulary: {exc}") from exc
        return tokenizer


def tokenizer_from_gguf(model_file: VocabularyFile) -> GGUFTokenizer:
    kind = model_file.get("tokenizer.ggml.model")
    if kind not in DEFAULT_BOS_EOS:
        raise ImatrixError(f"{model_file.path}: tokenizer '{kind}' is not supported "
                           f"(supported: {', '.join(DEFAULT_BOS_EOS)})")
    # llama.cpp names an empty token after its id
    tokens = [text or f"[EMPTY_{index}]" for index, text in enumerate(model_file.require("tokenizer.ggml.tokens"))]
    vocab = {text: index for index, text in enumerate(tokens)}
    if len(vocab) < len(tokens):
        twice = next(text for index, text in enumerate(tokens) if vocab[text] != index)
        raise ImatrixError(f"{model_file.path}: token {twice!r} is in the vocabulary twice (llama.cpp refuses that)")
    default_bos, default_eos = DEFAULT_BOS_EOS[kind]
    if kind == "llama":
        _check_scores(model_file, len(tokens))
        add_bos, forces_bos = True, False

        def build_encoder() -> FragmentEncoder:
            return _sentencepiece(model_file, vocab, len(tokens))
    else:
        pre, merges = _byte_pair_tables(model_file, kind)
        add_bos, forces_bos = pre.add_bos, pre.forces_bos
        if kind == "gpt2" and not pre.has_bos:
            default_bos = None

        def build_encoder() -> FragmentEncoder:
            return _byte_pair(model_file, vocab, len(tokens), pre, merges)
    token_types = model_file.get("tokenizer.ggml.token_type")
    return GGUFTokenizer(
        build_encoder,
        special_tokens(tokens, vocab, token_types, model_file.get),
        bos_id=_special_id(model_file.get("tokenizer.ggml.bos_token_id"), default_bos, len(tokens)),
        add_bos=bool(model_file.get("tokenizer.ggml.add_bos_token", add_bos)) or forces_bos,
        eos_id=_special_id(model_file.get("tokenizer.ggml.eos_token_id"), default_eos, len(tokens)),
        add_eos=bool(model_file.get("tokenizer.ggml.add_eos_token", False)),
        fields={"architecture": model_file.architecture, "tokenizer_type": kind, "tokens": tokens,
                "pre_tokenizer_type": model_file.get("tokenizer.ggml.pre"), "token_type": token_types,
                "scores": model_file.get("tokenizer.ggml.scores"), "merges": model_file.get("tokenizer.ggml.merges")})


def _byte_pair_tables(model_file: VocabularyFile, kind: str) -> tuple[PreTokenizer, list[str]]:
    """The pre-tokenizer and merges of a BPE vocabulary, checked."""
    # a `gemma4` vocabulary always gets Gemma 4's pre-tokenizer; an empty name is llama.cpp's "default"
    name = "gemma4" if kind == "gemma4" else model_file.get("tokenizer.ggml.pre") or "default"
    pre = pre_tokenizer(name)
    if pre is None:
        raise ImatrixError(f"{model_file.path}: pre-tokenizer '{name}' is not one llama.cpp knows")
    merges = model_file.get("tokenizer.ggml.merges")
    if merges is None and name != "kimi-k2":  # Kimi K2's vocabulary needs none
        raise ImatrixError(f"{model_file.path}: metadata key 'tokenizer.ggml.merges' is missing")
    return pre, merges or []


def _byte_pair(model_file: VocabularyFile, vocab: dict[str, int], n_tokens: int, pre: PreTokenizer,
               merges: list[str]) -> BytePairEncoder:
    try:
        return BytePairEncoder(vocab, n_tokens, merges, pre)
    except Exception as exc:  # noqa: BLE001 - `tokenizers` raises plain Exceptions for a bad vocabulary
        raise ImatrixError(f"{model_file.path}: cannot build its tokenizer: {exc}") from exc


def _check_scores(model_file: VocabularyFile, n_tokens: int) -> None:
    scores = model_file.get("tokenizer.ggml.scores")
    if scores and len(scores) < n_tokens:
        raise ImatrixError(f"{model_file.path}: {len(scores)} token scores for {n_tokens} tokens")


def _sentencepiece(model_file: VocabularyFile, vocab: dict[str, int], n_tokens: int) -> SentencePieceEncoder:
    scores = model_file.get("tokenizer.ggml.scores") or [0.0] * n_tokens
    return SentencePieceEncoder(vocab, scores, bool(model_file.get("tokenizer.ggml.add_space_prefix", True)))


def _special_id(stored: Any, default: int | None, n_tokens: int) -> int | None:
    """The file's id if it is one of the vocabulary's, else llama.cpp's default (if that is)."""
    if stored is not None and 0 <= int(stored) < n_tokens:
        return int(stored)
    return default if default is not None and default < n_tokens else None
