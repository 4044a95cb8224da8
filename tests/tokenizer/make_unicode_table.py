"""Write `src/imatrix/data/unicode-categories.txt`: Unicode 15.1's general categories as ranges.

llama.cpp's pre-tokenizers classify code points by the general categories of Unicode 15.1 (its
`unicode-data.cpp` was generated from that version), whatever Python's own `unicodedata` knows.
Run with a `unicodedata` of that version, e.g. `pip install --target /tmp/ud unicodedata2==15.1.0`:
    PYTHONPATH=/tmp/ud python tests/tokenizer/make_unicode_table.py
"""

from __future__ import annotations

from pathlib import Path

try:
    import unicodedata2 as unicodedata
except ImportError:
    import unicodedata

VERSION = "15.1.0"
CLASSES = "LNMPS"  # letter, number, mark, punctuation, symbol; the rest (Z, C, Cn) is left out
TARGET = Path(__file__).resolve().parents[2] / "src" / "imatrix" / "data" / "unicode-categories.txt"
HEADER = f"""\
# General categories of Unicode {VERSION} (the version llama.cpp's tokenizer tables come from), reduced
# to the classes its pre-tokenizers tell apart: L letter, N number, M mark, P punctuation, S symbol.
# One range a line: first, last (hex), class. Code points not listed are separators, controls or unassigned.
# Written by tests/tokenizer/make_unicode_table.py.
"""


def ranges() -> list[tuple[int, int, str]]:
    found: list[tuple[int, int, str]] = []
    for code in range(0x110000):
        major = unicodedata.category(chr(code))[0]
        if major not in CLASSES:
            continue
        if found and found[-1][1] == code - 1 and found[-1][2] == major:
            found[-1] = (found[-1][0], code, major)
        else:
            found.append((code, code, major))
    return found


def main() -> None:
    if unicodedata.unidata_version != VERSION:
        raise SystemExit(f"needs Unicode {VERSION} data, this unicodedata has {unicodedata.unidata_version}")
    lines = [f"{first:04X} {last:04X} {major}" for first, last, major in ranges()]
    TARGET.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{TARGET}: {len(lines)} ranges")


if __name__ == "__main__":
    main()
