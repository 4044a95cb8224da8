"""Which type each tensor gets: llama-quantize's per-tensor choices for a file type ("mix").

Mirrors llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the file types this project
quantizes, written as tables: the default type of each file type, the categories of tensors, the
per-category upgrades by layer, and the fallback when a row is not a whole number of blocks.
Tensors must be visited in `llama_order` (llama.cpp's loader order) because the attn_v and ffn_down
choices depend on running counters, exactly as in llama.cpp.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import gguf

from imatrix.errors import ImatrixError
from imatrix.ggufio.types import type_sizes
from imatrix.quant.base import QuantType
from imatrix.quant.hifi import HIFI_TYPE_ID

QType = gguf.GGMLQuantizationType
T = QType  # short alias for the tables below


@dataclass(frozen=True)
class FileType:
    name: str
    ftype: int  # llama.cpp's LLAMA_FTYPE number, written as general.file_type
    default: QType
    # a file type of our own follows the per-tensor rules of the llama.cpp mix named here,
    # then stores each type of `substitutes` as the type it maps to
    rules: str = ""
    substitutes: tuple[tuple[enum.IntEnum, enum.IntEnum], ...] = ()

    @property
    def rules_name(self) -> str:
        return self.rules or self.name


_FT = gguf.LlamaFileType
FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", _FT.ALL_F32, T.F32),
        FileType("F16", _FT.MOSTLY_F16, T.F16),
        FileType("BF16", _FT.MOSTLY_BF16, T.BF16),
        FileType("Q4_0", _FT.MOSTLY_Q4_0, T.Q4_0),
        FileType("Q4_1", _FT.MOSTLY_Q4_1, T.Q4_1),
        FileType("Q5_0", _FT.MOSTLY_Q5_0, T.Q5_0),
        FileType("Q5_1", _FT.MOSTLY_Q5_1, T.Q5_1),
        FileType("Q8_0", _FT.MOSTLY_Q8_0, T.Q8_0),
        FileType("Q2_K", _FT.MOSTLY_Q2_K, T.Q2_K),
        FileType("Q3_K_S", _FT.MOSTLY_Q3_K_S, T.Q3_K),
        FileType("Q3_K_M", _FT.MOSTLY_Q3_K_M, T.Q3_K),
        FileType("Q3_K_L", _FT.MOSTLY_Q3_K_L, T.Q3_K),
        FileType("Q4_K_S", _FT.MOSTLY_Q4_K_S, T.Q4_K),
        FileType("Q4_K_M", _FT.MOSTLY_Q4_K_M, T.Q4_K),
        FileType("Q5_K_S", _FT.MOSTLY_Q5_K_S, T.Q5_K),
        FileType("Q5_K_M", _FT.MOSTLY_Q5_K_M, T.Q5_K),
        FileType("Q6_K", _FT.MOSTLY_Q6_K, T.Q6_K),
        FileType("IQ4_NL", _FT.MOSTLY_IQ4_NL, T.IQ4_NL),
        FileType("IQ4_XS", _FT.MOSTLY_IQ4_XS, T.IQ4_XS),
        # Q3_K_S's choices with every Q3_K tensor stored as Q3_K_HIFI (general.file_type = the type id)
        FileType("Q3_K_HIFI", int(HIFI_TYPE_ID), T.Q3_K, rules="Q3_K_S", substitutes=((T.Q3_K, HIFI_TYPE_ID),)),
    )
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
UNQUANTIZED = frozenset({T.F32, T.F16, T.BF16})


def parse_file_type(text: str) -> FileType:
    """A file type by name (any case, llama-quantize's aliases) or by its LLAMA_FTYPE number."""
    key = ALIASES.get(text.upper(), text.upper())
    if key in FILE_TYPES:
        return FILE_TYPES[key]
    by_number = {str(int(ft.ftype)): ft for ft in FILE_TYPES.values()}
    if text.strip() in by_number:
        return by_number[text.strip()]
    names = ", ".join([*FILE_TYPES, *ALIASES])
    raise ImatrixError(f"unknown quantization type '{text}' (choose from {names})")


def looks_like_file_type(text: str) -> bool:
    """Whether llama-quantize reads `text` as a file type (`try_parse_ftype`), one this project
    quantizes or not: it then takes `<input> <type>` to mean the output's name is made up."""
    llama_names = {ft.name.removeprefix("MOSTLY_").removeprefix("ALL_") for ft in gguf.LlamaFileType}
    numbers = {str(int(ft)) for ft in gguf.LlamaFileType}
    upper = text.upper()
    return upper in FILE_TYPES or upper in ALIASES or upper in llama_names or upper == "COPY" or text in numbers


def llama_cpp_type_name(text: str) -> str:
    """The name llama-quantize gives the file type `text`: the first entry of its list that matches,
    where the aliases (Q4_K for Q4_K_M, ...) come before the names they stand for."""
    ft = parse_file_type(text)
    if text.upper() in ALIASES:
        return text.upper()
    alias_of = {name: alias for alias, name in ALIASES.items()}
    return alias_of.get(ft.name, ft.name) if text.strip().isdigit() else ft.name


def parse_tensor_type(text: str) -> enum.IntEnum:
    """A tensor type by its ggml name in any case (`q8_0`, `Q6_K`), or a registered project type."""
    known: dict[str, enum.IntEnum] = {q.name: q for q in QType}
    known.update({q.name: q for q in QuantType.registry})  # type: ignore[misc]
    try:
        return known[text.upper()]
    except KeyError:
        raise ImatrixError(f"unknown tensor type '{text}'") from None


def type_name(qtype: enum.IntEnum) -> str:
    """ggml's spelling: `q4_K`, `q8_0`, `iq4_xs`, `f16`."""
    return re.sub(r"_k\b", "_K", qtype.name.lower())


def block_size(qtype: enum.IntEnum) -> int:
    return type_sizes(qtype)[0]


def row_bytes(qtype: enum.IntEnum, n_cols: int) -> int:
    blck, size = type_sizes(qtype)
    return n_cols // blck * size


# --- which tensors are quantized at all (llama.cpp: tensor_allows_quantization) ---

NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    dims = [int(n) for n in shape]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return len(dims)


def allows_quantization(name: str, shape: Sequence[int], leave_output_tensor: bool = False) -> bool:
    """Only 2-D and 3-D `*weight` tensors, minus norms, routers, position embeddings and tiny tables."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    if name in NEVER_QUANTIZED_NAMES:
        return False
    return not any(part in name for part in NEVER_QUANTIZED)


# --- tensor categories (llama.cpp: tensor_get_category; first match wins) ---


class Cat(enum.Enum):
    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_Q = "attn_q"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


EXACT_CATEGORIES = {
    "output.weight": Cat.OUTPUT,
    "token_embd.weight": Cat.TOKEN_EMBD,
    "per_layer_token_embd.weight": Cat.TOKEN_EMBD,
}
SUBSTRING_CATEGORIES = (
    ("attn_qkv.weight", Cat.ATTN_QKV),
    ("attn_kv_b.weight", Cat.ATTN_KV_B),
    ("attn_v.weight", Cat.ATTN_V),
    ("attn_k.weight", Cat.ATTN_K),
    ("attn_q.weight", Cat.ATTN_Q),
    ("attn_output.weight", Cat.ATTN_OUTPUT),
    ("ffn_up", Cat.FFN_UP),
    ("ffn_gate", Cat.FFN_GATE),
    ("ffn_down", Cat.FFN_DOWN),
)
ATTN_V_LIKE = frozenset({Cat.ATTN_V, Cat.ATTN_QKV, Cat.ATTN_KV_B})


def category(name: str) -> Cat:
    if name in EXACT_CATEGORIES:
        return EXACT_CATEGORIES[name]
    return next((cat for part, cat in SUBSTRING_CATEGORIES if part in name), Cat.OTHER)


_BLOCK = re.compile(r"blk\.(\d+)\.")


def block_index(name: str) -> int:
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else -1


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's loader order: by block number (non-block tensors first), then by name."""
    return sorted(names, key=lambda n: (block_index(n), n))


# --- the model facts the mixes look at ---


@dataclass(frozen=True)
class ModelFacts:
    arch: str = "llama"
    n_layer: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    n_expert: int = 0
    n_attention_wv: int = 0
    tied_embeddings: bool = True  # no output.weight: token_embd doubles as the output projection

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama.cpp names an 80-layer llama with grouped KV heads "70B" and gives its attn_v more bits
        return self.arch == "llama" and self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv

    @property
    def falcon(self) -> bool:
        return self.arch == "falcon"


def _first(value: object) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else 0
    return int(value) if value is not None else 0


def model_facts(metadata: dict[str, object], tensor_names: Sequence[str]) -> ModelFacts:
    """Facts from GGUF metadata (`{arch}.block_count` etc.) and the tensor list."""
    arch = str(metadata.get("general.architecture", "llama"))
    n_head = _first(metadata.get(f"{arch}.attention.head_count"))
    n_head_kv = _first(metadata.get(f"{arch}.attention.head_count_kv", n_head))
    return ModelFacts(
        arch=arch,
        n_layer=_first(metadata.get(f"{arch}.block_count")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_expert=_first(metadata.get(f"{arch}.expert_count")),
        n_attention_wv=sum(category(n) in ATTN_V_LIKE for n in tensor_names),
        tied_embeddings="output.weight" not in tensor_names,
    )


# --- per-category rules: (file type, model, state, layer) -> upgraded type or None ---


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


@dataclass
class MixState:
    model: ModelFacts
    has_imatrix: bool = False
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    n_fallback: int = 0
    fallback_notes: list[str] = field(default_factory=list)


Rule = Callable[[MixState, int, int], "QType | None"]

ATTN_V_RULES: dict[str, Rule] = {
    "Q2_K": lambda s, i, n: T.Q4_K if s.model.n_gqa >= 4 else T.Q3_K,
    "Q3_K_M": lambda s, i, n: T.Q5_K if i < 2 else T.Q4_K,
    "Q3_K_L": lambda s, i, n: T.Q5_K,
    "IQ4_NL": lambda s, i, n: T.Q5_K if s.model.n_gqa >= 4 else None,
    "IQ4_XS": lambda s, i, n: T.Q5_K if s.model.n_gqa >= 4 else None,
    "Q4_K_M": lambda s, i, n: T.Q6_K if use_more_bits(i, n) else None,
    "Q5_K_M": lambda s, i, n: T.Q6_K if use_more_bits(i, n) else None,
    "Q4_K_S": lambda s, i, n: T.Q5_K if i < 4 else None,
}


def _q3_k_m_ffn_down(s: MixState, i: int, n: int) -> QType:
    if i < n // 16:
        return T.Q5_K
    # llama_tensor_get_type_impl: "arch != FALCON || use_more_bits" makes every non-Falcon layer Q4_K
    return T.Q4_K if not s.model.falcon or use_more_bits(i, n) else T.Q3_K


def _q4_k_m_ffn_down(s: MixState, i: int, n: int) -> QType | None:
    if s.model.falcon:
        return T.Q6_K if i < n // 16 else T.Q5_K if use_more_bits(i, n) else T.Q4_K
    return T.Q6_K if use_more_bits(i, n) else None


def _iq4_ffn_down(s: MixState, i: int, n: int) -> QType | None:
    return T.Q5_K if i < n // 8 and not s.has_imatrix else None


FFN_DOWN_RULES: dict[str, Rule] = {
    "Q2_K": lambda s, i, n: T.Q3_K,
    "Q3_K_M": _q3_k_m_ffn_down,
    "Q3_K_L": lambda s, i, n: T.Q4_K if s.model.falcon else T.Q5_K,
    "Q4_K_M": _q4_k_m_ffn_down,
    "IQ4_NL": _iq4_ffn_down,
    "IQ4_XS": _iq4_ffn_down,
    "Q5_K_M": lambda s, i, n: T.Q6_K if use_more_bits(i, n) else None,
    "Q4_K_S": lambda s, i, n: T.Q5_K if not s.model.falcon and i < n // 8 else None,
    # only with an imatrix, so that quantizing without one gives what it always gave
    "Q4_0": lambda s, i, n: T.Q4_1 if s.has_imatrix and i < n // 8 else None,
    "Q5_0": lambda s, i, n: T.Q5_1 if s.has_imatrix and i < n // 8 else None,
}

ATTN_OUTPUT_RULES = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}
ATTN_OUTPUT_FALCON_RULES = {"Q3_K_L": T.Q4_K}
ATTN_OUTPUT_8_EXPERTS = frozenset({"Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"})


def _attn_v(s: MixState, ft: FileType, new: QType, name: str) -> QType:
    rule = ATTN_V_RULES.get(ft.rules_name)
    chosen = rule(s, s.i_attention_wv, s.model.n_attention_wv) if rule else None
    if chosen is not None:
        new = chosen
    if s.model.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K
    if s.model.n_expert == 8:
        new = T.Q8_0
    s.i_attention_wv += 1
    return new


def _ffn_down(s: MixState, ft: FileType, new: QType, name: str) -> QType:
    i_layer, n_layer = s.i_ffn_down, s.model.n_layer
    if s.model.n_expert > 1:
        # llama_tensor_get_type_impl: expert tensors are not in layer order, so the layer comes from the name
        i_layer = block_index(name)
        if not 0 <= i_layer < n_layer:
            raise ImatrixError(f"{name}: cannot tell its layer (must be in [0, {n_layer}))")
    rule = FFN_DOWN_RULES.get(ft.rules_name)
    chosen = rule(s, i_layer, n_layer) if rule else None
    s.i_ffn_down += 1
    return new if chosen is None else chosen


def _attn_output(s: MixState, ft: FileType, new: QType, name: str) -> QType:
    if s.model.falcon:
        return ATTN_OUTPUT_FALCON_RULES.get(ft.rules_name, new)
    if s.model.n_expert == 8:
        return T.Q5_K if ft.rules_name in ATTN_OUTPUT_8_EXPERTS else new
    return ATTN_OUTPUT_RULES.get(ft.rules_name, new)


def _attn_k(s: MixState, ft: FileType, new: QType, name: str) -> QType:
    return T.Q8_0 if s.model.n_expert == 8 else new


# ATTN_QKV and ATTN_KV_B go through the attn_v rule: llama_tensor_get_type_impl tests attn_v-likeness
# first, so its separate attn_qkv branch is never reached.
CATEGORY_RULES = {
    **{cat: _attn_v for cat in ATTN_V_LIKE},
    Cat.FFN_DOWN: _ffn_down,
    Cat.ATTN_OUTPUT: _attn_output,
    Cat.ATTN_K: _attn_k,
}


@dataclass(frozen=True)
class Overrides:
    output_tensor_type: enum.IntEnum | None = None
    token_embedding_type: enum.IntEnum | None = None
    pure: bool = False


def _output_type(s: MixState, ft: FileType, new: QType, n_cols: int, ov: Overrides) -> enum.IntEnum:
    if ov.output_tensor_type is not None:
        return ov.output_tensor_type
    if s.model.falcon or n_cols % block_size(new):
        return T.Q8_0
    return new if new == T.Q8_0 else T.Q6_K


def _mixed_type(s: MixState, ft: FileType, name: str, n_cols: int, ov: Overrides) -> enum.IntEnum:
    cat = category(name)
    new = ft.default
    if cat == Cat.OUTPUT or (cat == Cat.TOKEN_EMBD and s.model.tied_embeddings):
        return _output_type(s, ft, new, n_cols, ov)
    if cat == Cat.TOKEN_EMBD:
        return new
    rule = CATEGORY_RULES.get(cat)
    return rule(s, ft, new, name) if rule else new


# target type -> the 32-block type used when a row is not a whole number of blocks
FALLBACKS = {
    T.IQ4_XS: T.IQ4_NL,
    T.IQ3_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL,
    T.IQ2_S: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL,
    T.IQ2_XXS: T.IQ4_NL,
    T.IQ1_M: T.IQ4_NL,
    T.IQ1_S: T.IQ4_NL,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.TQ1_0: T.Q4_0,
    T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def fallback(s: MixState, name: str, n_cols: int, target: enum.IntEnum) -> enum.IntEnum:
    """llama.cpp's tensor_type_fallback, with its warning line."""
    qk = block_size(target)
    if n_cols % qk == 0:
        return target
    s.n_fallback += 1
    note = f"warning: {name:<36} - ncols {n_cols:6d} not divisible by {qk:3d} "
    note += f"(required for type {type_name(target):>7}) "
    if target in FALLBACKS:
        chosen: enum.IntEnum = FALLBACKS[target]
    elif qk <= 32:
        chosen = target
    else:
        raise ImatrixError(f"{name}: no fallback type is defined for {target.name} ({n_cols} columns)")
    if n_cols % block_size(chosen):
        note += "(WARNING: must use F16 due to unusual shape) "
        chosen = T.F16
    note += f"-> falling back to {type_name(chosen):>7}"
    s.fallback_notes.append(note)
    return chosen


def choose_type(
    s: MixState, ft: FileType, name: str, shape: Sequence[int], current: enum.IntEnum, ov: Overrides
) -> enum.IntEnum:
    """The type `name` (ggml shape `shape`, now of type `current`) gets in file type `ft`.

    Call once per tensor in `llama_order`: the attn_v and ffn_down rules count tensors as they go.
    """
    if not allows_quantization(name, shape, leave_output_tensor=False):
        return current
    cat = category(name)
    if ov.token_embedding_type is not None and cat == Cat.TOKEN_EMBD:
        return _fitting_override(name, shape, ov.token_embedding_type, "--token-embedding-type")
    if ov.output_tensor_type is not None and cat == Cat.OUTPUT:
        return _fitting_override(name, shape, ov.output_tensor_type, "--output-tensor-type")
    if ft.default in UNQUANTIZED:
        return ft.default
    n_cols = int(shape[0])
    chosen = ft.default if ov.pure else _mixed_type(s, ft, name, n_cols, ov)
    chosen = fallback(s, name, n_cols, chosen)
    return dict(ft.substitutes).get(chosen, chosen)


def _fitting_override(name: str, shape: Sequence[int], qtype: enum.IntEnum, flag: str) -> enum.IntEnum:
    """A type asked for by name: it must fit the rows, there is no fallback to choose (llama.cpp fails too)."""
    block = type_sizes(qtype)[0]
    if int(shape[0]) % block:
        raise ImatrixError(f"{flag} {type_name(qtype)}: {name} has rows of {int(shape[0])} values, not a multiple "
                           f"of its {block}-value blocks")
    return qtype


def plan_types(
    ft: FileType,
    tensors: Sequence[tuple[str, Sequence[int], enum.IntEnum]],
    metadata: dict[str, object],
    overrides: Overrides = Overrides(),
    has_imatrix: bool = False,
    leave_output_tensor: bool = False,
) -> tuple[dict[str, enum.IntEnum], MixState]:
    """Types for `(name, ggml shape, current type)` tensors; visits them in llama.cpp's order."""
    by_name = {name: (shape, current) for name, shape, current in tensors}
    state = MixState(model_facts(metadata, list(by_name)), has_imatrix=has_imatrix)
    chosen: dict[str, enum.IntEnum] = {}
    for name in llama_order(by_name):
        shape, current = by_name[name]
        if leave_output_tensor and name == "output.weight":
            chosen[name] = current
            continue
        chosen[name] = choose_type(state, ft, name, shape, current, overrides)
    return chosen, state
