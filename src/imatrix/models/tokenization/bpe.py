"""BPE over pre-tokenized words, as llama.cpp's `llm_tokenizer_bpe_session` merges them.

The merging itself is `tokenizers`' BPE model: both take the pair of lowest merge rank first, the
leftmost on a tie. What llama.cpp does beyond it is done here:
  - a merge's parts and result need not be tokens: strings missing from the vocabulary get ids past
    its end, and any such piece left at the end falls back to single-byte tokens (`<0xXX>` ones
    for vocabularies that are not byte-level), the ones that exist
  - with `ignore_merges`, a word that is a token is taken whole (and so, for Gemma 4, a run of newlines)
  - the first of two equal merges counts (the later one's rank is never used)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models

from imatrix.models.tokenization.pretokenizers import PreTokenizer
from imatrix.models.tokenization.splitting import split_words

CACHE_LIMIT = 1 << 20  # words remembered between calls


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest for U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(0x100 + index) for index, byte in enumerate(others)})
    return table


BYTE_CHARS = str.maketrans({chr(byte): char for byte, char in byte_to_char().items()})


def merge_pairs(merges: Iterable[str]) -> list[tuple[str, str]]:
    """The merges as pairs: cut at the first space after the first character (`llama_vocab::impl::load`),
    the first of duplicates kept (one with nothing on a side can never apply)."""
    pairs: dict[tuple[str, str], None] = {}
    for merge in merges:
        cut = merge.find(" ", 1)
        if 0 < cut < len(merge) - 1:
            pairs.setdefault((merge[:cut], merge[cut + 1:]), None)
    return list(pairs)


class BytePairEncoder:
    def __init__(self, vocab: dict[str, int], n_tokens: int, merges: Sequence[str], pre: PreTokenizer) -> None:
        self.vocab, self.pre = vocab, pre
        pairs = merge_pairs(merges)
        extended = dict(vocab)
        n_vocab = len(vocab)
        for left, right in pairs:
            for piece in (left, right, left + right):
                if piece not in extended:  # nearly every piece is a token: count only the new ones
                    extended[piece] = n_tokens + len(extended) - n_vocab
        self.n_tokens = n_tokens
        self.unknown = "\x00" * (1 + max(map(len, extended), default=0))  # stands for a character no merge knows
        extended[self.unknown] = n_tokens + len(extended) - n_vocab
        self.model = Tokenizer(models.BPE(vocab=extended, merges=pairs, unk_token=self.unknown, fuse_unk=False))
        self.cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, after_special: bool = False) -> list[int]:
        """The tokens of raw text (no special tokens in it); `after_special` matters to SentencePiece only."""
        words = split_words(text.replace(" ", "\u2581") if self.pre.escape_whitespace else text, self.pre.splits)
        if self.pre.byte_encode:
            words = [word.encode("utf-8").decode("latin-1").translate(BYTE_CHARS) for word in words]
        if len(self.cache) > CACHE_LIMIT:
            self.cache.clear()
        self._learn({word for word in words if word not in self.cache})
        return [token for word in words for token in self.cache[word]]

    def _learn(self, words: set[str]) -> None:
        merged = []
        for word in words:
            whole = self.vocab.get(word) if self._taken_whole(word) else None
            if whole is not None:
                self.cache[word] = (whole,)
            elif word:
                merged.append(word)
            else:
                self.cache[word] = ()
        if not merged:
            return
        encoding = self.model.encode(merged, is_pretokenized=True, add_special_tokens=False)
        pieces: list[list[int]] = [[] for _ in merged]
        for token, word_index, (first, last) in zip(encoding.ids, encoding.word_ids, encoding.offsets, strict=True):
            word = merged[word_index]
            pieces[word_index].extend((token,) if token < self.n_tokens else self._fallback(word[first:last]))
        self.cache.update(zip(merged, map(tuple, pieces), strict=True))

    def _taken_whole(self, word: str) -> bool:
        return self.pre.ignore_merges or (self.pre.whole_newline_runs and not word.strip("\n"))

    def _fallback(self, piece: str) -> list[int]:
        """A piece that is no token, as llama.cpp spells it out: one token per byte, where there is one."""
        spelled = ((chr(byte) if byte < 0x80 else None) if self.pre.byte_encode else f"<0x{byte:02X}>"
                   for byte in piece.encode("utf-8"))
        return [self.vocab[text] for text in spelled if text in self.vocab]
