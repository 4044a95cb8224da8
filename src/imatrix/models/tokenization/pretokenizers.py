"""llama.cpp's pre-tokenizers: how `tokenizer.ggml.pre` cuts text into the words BPE merges within.

Each pre-tokenizer is a list of regexes; each one cuts every piece the ones before it left, keeping
both its matches and the text between them (`llama-vocab`'s `llm_tokenizer_bpe`, `unicode_regex_split`).
llama.cpp runs a regex one of two ways, and so do we:
  UnicodeSplit   the common ones (GPT-2, Llama 3, Qwen 2, Qwen 3.5, Kimi K2, digit groups, newline runs),
                 for which it has hand-written splitters: the regex with `\\p{..}` and `\\s` read as
                 Unicode 15.1 classes (`unicode.py`)
  RegexSplit     the rest, through `std::regex`, which knows no Unicode classes: `\\p{..}` becomes an
                 ASCII class plus one stand-in character per class, and the text is folded the same way
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache

from imatrix.models.tokenization import unicode

CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"


@dataclass(frozen=True)
class UnicodeSplit:
    """A regex whose `\\p{L}`, `\\p{N}`, `\\p{M}`, `\\p{Han}`, `\\p{L-Han}` (letters but Han) and `\\s`
    are Unicode 15.1's classes, run on the text as it is."""

    source: str

    def view(self, text: str) -> str:
        return text

    def compiled(self) -> re.Pattern[str]:
        return _compiled_unicode(self.source)


@dataclass(frozen=True)
class RegexSplit:
    """A regex as llama.cpp's `std::regex` runs it: on folded text if it names a Unicode class, else on
    the code points with non-ASCII whitespace folded to a vertical tab (so that `\\s` still takes it)."""

    source: str

    def view(self, text: str) -> str:
        return unicode.folded(text) if _names_class(self.source) else unicode.spaces_folded(text)

    def compiled(self) -> re.Pattern[str]:
        return _compiled_std(self.source)


Split = UnicodeSplit | RegexSplit

# llama.cpp's hand-written splitters, as the regexes they implement
GPT2 = UnicodeSplit(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3 = UnicodeSplit(CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                      r"|\s+(?!\S)|\s+")
QWEN2 = UnicodeSplit(CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                     r"|\s+")
QWEN35 = UnicodeSplit(CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KIMI_K2 = UnicodeSplit(r"\p{Han}+|[^\r\n\p{L}\p{N}]?\p{L-Han}+" + CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# digit runs cut in threes from the right; llama.cpp's splitter (`unicode_regex_split_custom_afmoe`)
# keeps the text before a run together with the run's first group
DIGIT_GROUPS = UnicodeSplit(r"\P{N}*(?:\p{N}{1,2}(?=(?:\p{N}{3})*(?!\p{N}))|\p{N}{3})|\P{N}+")
NEWLINE_RUNS = UnicodeSplit(r"[^\n]+|\n+")

NUMBERS = RegexSplit(r"\p{N}+")
DIGIT = RegexSplit(r"\p{N}")
UP_TO_3_DIGITS = RegexSplit(r"\p{N}{1,3}")
THREE_DIGITS = RegexSplit(r"[0-9][0-9][0-9]")
CJK_KANA = RegexSplit(r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+")
CJK_HANGUL = RegexSplit(r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+")
PUNCT_WORDS = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
               r"| ?[\p{P}\p{S}]+")
BLOOM = RegexSplit(r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+")
CASED_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + CONTRACTIONS +
               r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + CONTRACTIONS + "?")


def lookahead_cased_words(suffix: str = "", letter: str = r"\p{L}") -> str:
    """Runs of upper- then lower-case letters, written with lookaheads as llama.cpp spells them for std::regex."""
    upper, lower = rf"((?=[{letter}])([^a-z]))", rf"((?=[{letter}])([^A-Z]))"
    return rf"[^\r\n\p{{L}}\p{{N}}]?{upper}*{lower}+{suffix}|[^\r\n\p{{L}}\p{{N}}]?{upper}+{lower}*{suffix}"


TAIL = r"|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[Split, ...]
    byte_encode: bool = True  # words go through GPT-2's byte-to-character table; else raw, `<0xXX>` byte tokens
    ignore_merges: bool = False  # a word that is a token is taken whole (llama.cpp's `ignore_merges`)
    add_bos: bool = False  # llama.cpp's default where the file has no `tokenizer.ggml.add_bos_token`
    escape_whitespace: bool = False  # spaces become '▁' before splitting
    forces_bos: bool = False  # BOS whatever the file says (Gemma 4)
    has_bos: bool = True  # False: no BOS token unless the file names one
    whole_newline_runs: bool = False  # a run of newlines that is a token is taken whole (Gemma 4)


# llama.cpp's `llama_vocab_pre_type`s, keyed by the name of the first `tokenizer.ggml.pre` value mapping to them
TYPES: dict[str, PreTokenizer] = {
    "default": PreTokenizer((RegexSplit(r"[\p{P}\$\+<=>\^~\|]+"), GPT2, NUMBERS, THREE_DIGITS)),
    "llama3": PreTokenizer((LLAMA3,)),
    "jais-2": PreTokenizer((RegexSplit(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}"),)),
    "deepseek-llm": PreTokenizer((
        RegexSplit(r"[\r\n]"),
        RegexSplit(r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
                   r"\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
                   r"\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
                   r"\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
                   r"\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
                   r"\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
                   r"\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
                   r"\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
                   r"\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
                   r"\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
                   r"\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
                   r"\U0001e900-\U0001e943]+"),
        RegexSplit(r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),
        RegexSplit(r"\s+$"),
        CJK_HANGUL,
        NUMBERS)),
    "deepseek-v3": PreTokenizer((UP_TO_3_DIGITS, CJK_KANA, RegexSplit(PUNCT_WORDS + r"[\r\n]*" + TAIL))),
    "spark2_5": PreTokenizer((UP_TO_3_DIGITS, CJK_KANA, RegexSplit(PUNCT_WORDS + r"|[\r\n]|\s+(?!\S)|\s+"), DIGIT)),
    "youtu": PreTokenizer((
        RegexSplit(r"[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
                   r"\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
        RegexSplit(CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + TAIL))),
    "deepseek-coder": PreTokenizer((RegexSplit(r"[\r\n]"), RegexSplit(r"\s?\p{L}+"), RegexSplit(r"\s?\p{P}+"),
                                    CJK_HANGUL, DIGIT)),
    "falcon": PreTokenizer((RegexSplit(r"[\p{P}\$\+<=>\^~\|`]+"), GPT2, THREE_DIGITS)),
    "starcoder": PreTokenizer((DIGIT, GPT2)),
    "gpt-2": PreTokenizer((GPT2,)),
    "qwen2": PreTokenizer((QWEN2,)),
    "qwen35": PreTokenizer((QWEN35,)),
    "bloom": PreTokenizer((BLOOM,)),
    "viking": PreTokenizer((BLOOM, DIGIT)),
    "tekken": PreTokenizer((RegexSplit(lookahead_cased_words() + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                                       + TAIL),)),
    "chameleon": PreTokenizer((
        RegexSplit(r"<sentinel:[0-9]+>"), RegexSplit(r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"),
        RegexSplit(r"([\t\n]|    |  )"), DIGIT, RegexSplit(r"[\p{P}!-/:-@\[-`{-~]"), GPT2)),
    "gpt-4o": PreTokenizer((RegexSplit(lookahead_cased_words(CONTRACTIONS + "?")
                                       + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + TAIL),)),
    "granite-embed-multi-97m": PreTokenizer((RegexSplit(
        lookahead_cased_words(CONTRACTIONS + "?", r"\p{L}\p{M}")
        + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + TAIL),)),
    "tiny_aya": PreTokenizer((DIGIT_GROUPS, RegexSplit(CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + TAIL))),
    "kimi-k2": PreTokenizer((KIMI_K2,)),
    "superbpe": PreTokenizer((NUMBERS, RegexSplit(r"(?=(\d{3})+(?!\d))"))),
    "bailingmoe": PreTokenizer((RegexSplit(r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                                           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"),)),
    "seed-coder": PreTokenizer((RegexSplit(CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                                           + TAIL),)),
    "ufakzeka": PreTokenizer((RegexSplit(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*" + TAIL),)),
    "afmoe": PreTokenizer((
        DIGIT_GROUPS,
        RegexSplit(r"[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf"
                   r"\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af"
                   r"\u1100-\u11ff]+"),
        RegexSplit(PUNCT_WORDS + r"[\r\n]*" + TAIL))),
    "laguna": PreTokenizer((NEWLINE_RUNS, QWEN2)),
    "exaone-moe": PreTokenizer((RegexSplit(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
        r"|\s*[\r\n]|\s+(?!\S)|\s+"),)),
    "gemma4": PreTokenizer((NEWLINE_RUNS,), byte_encode=False, escape_whitespace=True, whole_newline_runs=True,
                           forces_bos=True),
    "sarvam-moe": PreTokenizer((NEWLINE_RUNS,), byte_encode=False, escape_whitespace=True),
    "minicpm5": PreTokenizer((UP_TO_3_DIGITS, RegexSplit(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*" + TAIL)), ignore_merges=True),
    "whitespace": PreTokenizer((RegexSplit(r"\S+"),), byte_encode=False),
}

# `tokenizer.ggml.pre` values (llama.cpp's `llama_vocab::impl::load`): (type, what the value sets beyond it)
LLAMA3_NAMED = {"ignore_merges": True, "add_bos": True}
NAMES: dict[str, tuple[str, dict[str, bool]]] = {
    **dict.fromkeys(["default"], ("default", {})),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], ("llama3", LLAMA3_NAMED)),
    **dict.fromkeys(["dbrx", "smaug-bpe"], ("llama3", {})),
    **dict.fromkeys(["chatglm-bpe"], ("llama3", {"has_bos": False})),
    **dict.fromkeys(["glm4", "glm5"], ("llama3", {"has_bos": False, "ignore_merges": True})),
    **dict.fromkeys(["tekken"], ("tekken", LLAMA3_NAMED)),
    **dict.fromkeys(["chameleon"], ("chameleon", {"add_bos": True})),
    **dict.fromkeys(["youtu"], ("youtu", {"ignore_merges": True})),
    **dict.fromkeys(["granite-embed-multi-97m"], ("granite-embed-multi-97m", {"ignore_merges": True})),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
                     "trillion", "granite-docling", "exaone4"], ("gpt-2", {})),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
                    ("starcoder", {})),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
                     "grok-2"], ("qwen2", {})),
    **dict.fromkeys(["deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"], ("deepseek-v3", {})),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], ("gpt-4o", {})),
    **dict.fromkeys(["bloom", "poro-chat", "gpt3-finnish"], ("bloom", {})),
    **dict.fromkeys(["tiny_aya", "cohere2moe"], ("tiny_aya", {})),
    **dict.fromkeys(["bailingmoe", "bailingmoe2", "llada-moe"], ("bailingmoe", {})),
    **dict.fromkeys(["gemma4", "granite-embed-multi-311m"], ("gemma4", {})),
    **{name: (name, {}) for name in ("jais-2", "deepseek-llm", "deepseek-coder", "spark2_5", "falcon", "qwen35",
                                     "viking", "kimi-k2", "superbpe", "seed-coder", "ufakzeka", "afmoe", "laguna",
                                     "exaone-moe", "sarvam-moe", "minicpm5", "whitespace")},
}


def pre_tokenizer(name: str) -> PreTokenizer | None:
    """The pre-tokenizer llama.cpp uses for this `tokenizer.ggml.pre` (an empty one means "default")."""
    if name not in NAMES:
        return None
    kind, settings = NAMES[name]
    return replace(TYPES[kind], **settings)


def split_words(text: str, splits: tuple[Split, ...]) -> list[str]:
    """`text` cut by each regex in turn: every piece, matched or between matches, is kept."""
    views: dict[type, str] = {}
    spans = [(0, len(text))]
    for split in splits:
        view = views[type(split)] if type(split) in views else views.setdefault(type(split), split.view(text))
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
