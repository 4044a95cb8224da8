"""Cutting text with a list of regexes, both ways llama.cpp runs a regex (`unicode_regex_split`).

Each regex cuts every piece the ones before it left, keeping both its matches and the text between them.
  UnicodeSplit   the regexes llama.cpp has hand-written splitters for: `\\p{..}` and `\\s` are read as
                 Unicode 15.1 classes (`unicode.py`), which is what those splitters do
  RegexSplit     the rest, which llama.cpp hands to `std::regex`: that knows no Unicode classes, so
                 `\\p{..}` becomes its ASCII members plus one stand-in character per class, and the text is
                 folded the same way (non-ASCII whitespace to a vertical tab, which `\\s` takes)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from imatrix.models.tokenization import unicode


@dataclass(frozen=True)
class UnicodeSplit:
    """A regex whose `\\p{L}`, `\\p{N}`, `\\p{M}`, `\\p{Han}`, `\\p{L-Han}` (letters but Han) and `\\s`
    are Unicode 15.1's classes, run on the text as it is; `(?i:...)` folds ASCII letters only."""

    source: str
    view = "as is"

    def compiled(self) -> re.Pattern[str]:
        return _compiled_unicode(self.source)


@dataclass(frozen=True)
class RegexSplit:
    """A regex as llama.cpp's `std::regex` runs it: on folded text if it names a Unicode class, else on
    the code points with non-ASCII whitespace folded to a vertical tab (so that `\\s` still takes it)."""

    source: str

    @property
    def view(self) -> str:
        return "folded" if _names_class(self.source) else "spaces folded"

    def compiled(self) -> re.Pattern[str]:
        return _compiled_std(self.source)


@dataclass(frozen=True)
class TransformersSplit:
    """A `UnicodeSplit` whose regex is one of transformers' GGUF tokenizer table, read when first used: importing
    that table loads transformers' weight-conversion machinery, ~1 s of start-up for models that need none of it."""

    name: str  # the `tokenizer.ggml.pre` key of GGUF_PRE_TOKENIZER_SPLITS
    view = "as is"

    def compiled(self) -> re.Pattern[str]:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        return _compiled_unicode(GGUF_PRE_TOKENIZER_SPLITS[self.name])


Split = UnicodeSplit | RegexSplit | TransformersSplit
VIEWS = {"as is": str, "folded": unicode.folded, "spaces folded": unicode.spaces_folded}


def split_words(text: str, splits: tuple[Split, ...]) -> list[str]:
    """`text` cut by each regex in turn: every piece, matched or between matches, is kept."""
    views: dict[str, str] = {}
    spans = [(0, len(text))]
    for split in splits:
        if split.view not in views:
            views[split.view] = VIEWS[split.view](text)
        view = views[split.view]
        pattern = split.compiled()
        spans = [cut for start, end in spans for cut in _cut(pattern, view, start, end)]
    return [text[start:end] for start, end in spans]


def _cut(pattern: re.Pattern[str], view: str, start: int, end: int) -> list[tuple[int, int]]:
    # the regex sees each piece as a string of its own: lookaheads stop at its end
    piece = view[start:end] if start or end != len(view) else view
    cuts, done = [], 0
    for match in pattern.finditer(piece):
        first, last = match.span()
        if first > done:
            cuts.append((start + done, start + first))
        if last > first:
            cuts.append((start + first, start + last))
        done = last
    if done < len(piece):
        cuts.append((start + done, end))
    return cuts


CLASS_ESCAPE = re.compile(r"\\([pP])\{([^}]*)\}|\\([sS])")


@cache
def _compiled_unicode(source: str) -> re.Pattern[str]:
    def expand(match: re.Match[str], inside: bool) -> str:
        name = match.group(2) or "space"
        spans = unicode.ranges(name) if name != "L-Han" else unicode.without(unicode.ranges("L"), unicode.ranges("Han"))
        body = unicode.class_body(spans)
        negated = match.group(1) == "P" or match.group(3) == "S"
        if inside and negated:
            raise ValueError(f"a negated class inside brackets in {source!r}")
        return body if inside else f"[^{body}]" if negated else f"[{body}]"

    # ASCII: case-insensitive parts fold ASCII letters only, as llama.cpp's splitters do
    return re.compile(_rewritten(source, expand), re.ASCII)


# `\p{..}` in llama.cpp's std::regex patterns: a stand-in plus the class's ASCII members (`unicode_regex_split`)
ASCII_MEMBERS = {"N": "0-9", "L": "A-Za-z", "P": r"!-#%-*,-/:-;?-@\[-\]_\{\}", "M": "", "S": r"\$\+<->^`\|\~"}
STD_CLASSES = {"N": "N", "L": "L", "P": "P", "M": "M", "S": "S", "Lu": "L", "Ll": "L", "Lt": "L", "Lm": "L",
               "Lo": "L"}


def _names_class(source: str) -> bool:
    return any(f"\\p{{{name}}}" in source for name in STD_CLASSES)


@cache
def _compiled_std(source: str) -> re.Pattern[str]:
    fold = _names_class(source)

    def expand(match: re.Match[str], inside: bool) -> str:
        name = match.group(2)
        if not fold or match.group(1) != "p" or name not in STD_CLASSES:
            return match.group(0)
        body = unicode.STAND_INS[STD_CLASSES[name]] + ASCII_MEMBERS[STD_CLASSES[name]]
        return body if inside else f"[{body}]"

    # ASCII: `\s`, `\d` and `\b` as std::regex reads them in the C locale
    return re.compile(_rewritten(source, expand), re.ASCII)


def _rewritten(source: str, expand) -> str:  # noqa: ANN001 - (match, inside brackets) -> replacement
    """`source` with its class escapes expanded and ECMAScript's `$` (the end of the input only) as `\\Z`.
    Whether an escape stands inside brackets is told as llama.cpp tells it: an unescaped `[` opens, `]` closes."""
    out, inside, at = [], False, 0
    while at < len(source):
        char = source[at]
        escaped = at > 0 and source[at - 1] == "\\"
        match = CLASS_ESCAPE.match(source, at) if char == "\\" else None
        if match:
            out.append(expand(match, inside))
            at = match.end()
            continue
        if char == "[" and not escaped:
            inside = True
        elif char == "]" and inside and not escaped:
            inside = False
        out.append("\\Z" if char == "$" and not escaped and not inside else char)
        at += 1
    return "".join(out)
