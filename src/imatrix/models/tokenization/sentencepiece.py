"""SentencePiece vocabularies (`tokenizer.ggml.model = llama`), merged as llama.cpp's `llm_tokenizer_spm_session` does.

Spaces become '▁' (one is put first where llama.cpp adds a space prefix), the text is cut into
characters, and the adjacent pair whose join is a token with the highest score is merged, the
leftmost on a tie, until none is left. A character that is no token is spelled as `<0xXX>` byte tokens.

Ties of score decide the result, so this is not `tokenizers`' BPE (one rank per merge). To be quick,
the text is cut where no token could span the cut (no token holds the two characters on either side),
and each piece is merged once however often it occurs.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from imatrix.errors import ImatrixError

SPACE = "\u2581"
CACHE_LIMIT = 1 << 20  # pieces remembered between calls


class SentencePieceEncoder:
    def __init__(self, vocab: dict[str, int], scores: Sequence[float], add_space_prefix: bool) -> None:
        self.vocab, self.scores, self.add_space_prefix = vocab, scores, add_space_prefix
        self.score_of = {text: scores[index] for text, index in vocab.items()}
        self.joins = {text[at:at + 2] for text in vocab for at in range(len(text) - 1)}
        self.cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, after_special: bool = True) -> list[int]:
        """`after_special`: the text starts the input or follows a special token, where llama.cpp puts a space."""
        if self.add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", SPACE)
        if len(self.cache) > CACHE_LIMIT:
            self.cache.clear()
        ids: list[int] = []
        for piece in self._pieces(text):
            if piece not in self.cache:
                self.cache[piece] = tuple(self._merged(piece))
            ids.extend(self.cache[piece])
        return ids

    def _pieces(self, text: str) -> list[str]:
        cuts = [at for at in range(1, len(text)) if text[at - 1:at + 1] not in self.joins]
        return [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)] if text else []

    def _merged(self, piece: str) -> list[int]:
        symbols = list(piece)  # a merged symbol keeps its text; the one merged into it becomes ""
        after = list(range(1, len(piece))) + [-1]
        before = list(range(-1, len(piece) - 1))
        queue: list[tuple[float, int, int, str]] = []

        def offer(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                joined = symbols[left] + symbols[right]
                if joined in self.score_of:
                    heapq.heappush(queue, (-self.score_of[joined], left, right, joined))

        for left in range(len(piece) - 1):
            offer(left, left + 1)
        while queue:
            _, left, right, joined = heapq.heappop(queue)
            if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != joined:
                continue  # one side has changed since this pair was offered
            symbols[left], symbols[right] = joined, ""
            after[left] = after[right]
            if after[left] >= 0:
                before[after[left]] = left
            offer(before[left], left)
            offer(left, after[left])
        return [token for symbol in symbols if symbol for token in self._token_ids(symbol)]

    def _token_ids(self, symbol: str) -> list[int]:
        if symbol in self.vocab:
            return [self.vocab[symbol]]
        ids = []
        for byte in symbol.encode("utf-8"):
            # `llama_vocab::byte_to_token`: the byte token, else the byte itself as a one-character token
            spelled = next((text for text in (f"<0x{byte:02X}>", chr(byte) if byte < 0x80 else None)
                            if text in self.vocab), None)
            if spelled is None:
                raise ImatrixError(f"the vocabulary has no token for byte 0x{byte:02X} (of {symbol!r})")
            ids.append(self.vocab[spelled])
        return ids
