"""Code point classes as llama.cpp's tokenizers see them.

llama.cpp classifies code points by the general categories of Unicode 15.1 (whatever version
Python's `unicodedata` has), reads `\\s` as Unicode's White_Space set, and for its regex engine folds
every non-ASCII code point to one stand-in character per class (`llama-vocab`'s `unicode_regex_split`).
"""

from __future__ import annotations

from bisect import bisect_right
from functools import cache
from pathlib import Path

CATEGORY_TABLE = Path(__file__).resolve().parents[2] / "data" / "unicode-categories.txt"
# Unicode's White_Space property (not `str.isspace`, which also takes U+001C..U+001F)
WHITESPACE = frozenset((*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                        0x202F, 0x205F, 0x3000))
# CJK ideographs as llama.cpp's `unicode_cpt_is_han` counts them
HAN = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
       (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0x2F800, 0x2FA1F))


@cache
def _table() -> tuple[list[int], list[int], list[str]]:
    firsts, lasts, classes = [], [], []
    for line in CATEGORY_TABLE.read_text().splitlines():
        if line and not line.startswith("#"):
            first, last, major = line.split()
            firsts.append(int(first, 16))
            lasts.append(int(last, 16))
            classes.append(major)
    return firsts, lasts, classes


def category(code: int) -> str | None:
    """`L`, `N`, `M`, `P` or `S`; None for separators, controls and unassigned code points."""
    firsts, lasts, classes = _table()
    index = bisect_right(firsts, code) - 1
    return classes[index] if index >= 0 and code <= lasts[index] else None


@cache
def ranges(major: str) -> tuple[tuple[int, int], ...]:
    """The code point ranges of one class: `L`, `N`, `M`, `P`, `S`, `space` or `Han`."""
    if major == "space":
        return tuple((code, code) for code in sorted(WHITESPACE))
    if major == "Han":
        return HAN
    firsts, lasts, classes = _table()
    return tuple((first, last) for first, last, found in zip(firsts, lasts, classes, strict=True) if found == major)


def without(kept: tuple[tuple[int, int], ...], removed: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The ranges `kept` less every code point of `removed` (both sorted)."""
    result = []
    for first, last in kept:
        for cut_first, cut_last in removed:
            if cut_last < first or cut_first > last:
                continue
            if cut_first > first:
                result.append((first, cut_first - 1))
            first = cut_last + 1
        if first <= last:
            result.append((first, last))
    return tuple(result)


def class_body(spans: tuple[tuple[int, int], ...]) -> str:
    """The inside of a regex character class `[...]` holding these ranges."""
    return "".join(_escaped(first) if first == last else f"{_escaped(first)}-{_escaped(last)}"
                   for first, last in spans)


def _escaped(code: int) -> str:
    return f"\\U{code:08x}"


# llama.cpp's stand-ins for non-ASCII code points in the text its regexes run on
STAND_INS = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
OTHER_STAND_IN = "\xd0"
SPACE_STAND_IN = "\x0b"  # non-ASCII whitespace, so that ASCII `\s` still takes it


def folded(text: str) -> str:
    """`text` with every non-ASCII code point replaced by its class's stand-in (same length)."""
    return text.translate({ord(char): _stand_in(ord(char)) for char in set(text) if ord(char) > 0x7F})


def spaces_folded(text: str) -> str:
    """`text` with non-ASCII whitespace as a vertical tab, which an ASCII `\\s` matches."""
    return text.translate(_NON_ASCII_SPACES)


_NON_ASCII_SPACES = {code: SPACE_STAND_IN for code in WHITESPACE if code > 0x7F}


def _stand_in(code: int) -> str:
    if code in WHITESPACE:
        return SPACE_STAND_IN
    return STAND_INS.get(category(code) or "", OTHER_STAND_IN)
