"""llama.cpp's pre-tokenizers: how `tokenizer.ggml.pre` cuts text into the words BPE merges within.

llama.cpp maps each `tokenizer.ggml.pre` name to a pre-tokenizer type and settings
(`llama_vocab::impl::load`), and each type to a list of regexes (`llm_tokenizer_bpe`); `splitting.py`
runs them as it does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from imatrix.models.tokenization.splitting import RegexSplit, Split, TransformersSplit, UnicodeSplit

CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# llama.cpp's hand-written splitters, as the regexes they implement (transformers has three of them)
GPT2 = UnicodeSplit(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3 = TransformersSplit("llama3")
QWEN2 = TransformersSplit("qwen2")
QWEN35 = TransformersSplit("qwen35")
KIMI_K2 = UnicodeSplit(r"\p{Han}+|[^\r\n\p{L}\p{N}]?\p{L-Han}+" + CONTRACTIONS + r"?|\p{N}{1,3}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
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
    "tiny_aya": PreTokenizer((DIGIT_GROUPS,
                              RegexSplit(CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + TAIL))),
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
    # for llama.cpp's `whitespace` tokenizer (Jina's), which drops the spaces this leaves: with another one
    # llama.cpp asserts on them (it is named here for completeness; that tokenizer is not supported)
    "whitespace": PreTokenizer((RegexSplit(r"\S+"),), byte_encode=False),
}

# `tokenizer.ggml.pre` values (llama.cpp's `llama_vocab::impl::load`): (type, what the value sets beyond it)
LLAMA3_SETTINGS = {"ignore_merges": True, "add_bos": True}
NAMES: dict[str, tuple[str, dict[str, bool]]] = {
    "default": ("default", {}),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], ("llama3", LLAMA3_SETTINGS)),
    "dbrx": ("llama3", {}),
    "smaug-bpe": ("llama3", {}),
    "chatglm-bpe": ("llama3", {"has_bos": False}),
    "glm4": ("llama3", {"has_bos": False, "ignore_merges": True}),
    "glm5": ("llama3", {"has_bos": False, "ignore_merges": True}),
    "tekken": ("tekken", LLAMA3_SETTINGS),
    "chameleon": ("chameleon", {"add_bos": True}),
    "youtu": ("youtu", {"ignore_merges": True}),
    "granite-embed-multi-97m": ("granite-embed-multi-97m", {"ignore_merges": True}),
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
    """The pre-tokenizer llama.cpp uses for this `tokenizer.ggml.pre`; None for a name it does not know."""
    if name not in NAMES:
        return None
    kind, settings = NAMES[name]
    return replace(TYPES[kind], **settings)
