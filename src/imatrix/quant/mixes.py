"""Which type each tensor gets: llama-quantize's per-tensor choices for a file type ("mix").

Mirrors llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for every file type llama-quantize
lists, written as tables: the default type of each file type, the categories of tensors, the
per-category upgrades by layer, the `--tensor-type` patterns that replace them, the fallback when a
row is not a whole number of blocks, and which results need an imatrix. Tensors must be visited in
`llama_order` (llama.cpp's loader order; file order under --keep-split) because the attn_v and
ffn_down/gate/up choices depend on running counters, exactly as in llama.cpp.

A file type is listed whether or not this project has its kernels yet (`FileType.kernels_ready`):
its mix, sizes (--dry-run) and imatrix rules hold either way; quantizing to a type without a kernel
is refused when the job is planned, before anything is written.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import gguf

from imatrix.errors import ImatrixError
from imatrix.ggufio.types import type_sizes
from imatrix.quant.base import NewGGMLType, QuantType, ggml_type
from imatrix.quant.hifi import HIFI_TYPE_ID

QType = gguf.GGMLQuantizationType
T = QType  # short alias for the tables below
Q2_0 = ggml_type("Q2_0")


@dataclass(frozen=True)
class FileType:
    name: str
    ftype: int  # llama.cpp's LLAMA_FTYPE number, written as general.file_type
    default: enum.IntEnum
    # a file type of our own follows the per-tensor rules of the llama.cpp mix named here,
    # then stores each type of `substitutes` as the type it maps to
    rules: str = ""
    substitutes: tuple[tuple[enum.IntEnum, enum.IntEnum], ...] = ()

    @property
    def rules_name(self) -> str:
        return self.rules or self.name

    @property
    def kernels_ready(self) -> bool:
        """Whether this project has the kernel of the file type's default type (its mix may still pick others)."""
        stored = dict(self.substitutes).get(self.default, self.default)
        return stored in UNQUANTIZED or stored in QuantType.registry


# llama-quantize's list (tools/quantize/quantize.cpp QUANT_OPTIONS), in its order, with each file type's
# default tensor type (llama_ftype_get_default_type); COPY keeps every tensor as it is
FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("Q1_0", 40, T.Q1_0),
        FileType("Q2_0", 41, Q2_0),
        FileType("Q4_0", 2, T.Q4_0),
        FileType("Q4_1", 3, T.Q4_1),
        FileType("MXFP4_MOE", 38, T.MXFP4),
        FileType("Q5_0", 8, T.Q5_0),
        FileType("Q5_1", 9, T.Q5_1),
        FileType("IQ2_XXS", 19, T.IQ2_XXS),
        FileType("IQ2_XS", 20, T.IQ2_XS),
        FileType("IQ2_S", 28, T.IQ2_XS),
        FileType("IQ2_M", 29, T.IQ2_S),
        FileType("IQ1_S", 24, T.IQ1_S),
        FileType("IQ1_M", 31, T.IQ1_M),
        FileType("TQ1_0", 36, T.TQ1_0),
        FileType("TQ2_0", 37, T.TQ2_0),
        FileType("Q2_K", 10, T.Q2_K),
        FileType("Q2_K_S", 21, T.Q2_K),
        FileType("IQ3_XXS", 23, T.IQ3_XXS),
        FileType("IQ3_S", 26, T.IQ3_S),
        FileType("IQ3_M", 27, T.IQ3_S),
        FileType("IQ3_XS", 22, T.IQ3_S),
        FileType("Q3_K_S", 11, T.Q3_K),
        FileType("Q3_K_M", 12, T.Q3_K),
        FileType("Q3_K_L", 13, T.Q3_K),
        FileType("IQ4_NL", 25, T.IQ4_NL),
        FileType("IQ4_XS", 30, T.IQ4_XS),
        FileType("Q4_K_S", 14, T.Q4_K),
        FileType("Q4_K_M", 15, T.Q4_K),
        FileType("Q5_K_S", 16, T.Q5_K),
        FileType("Q5_K_M", 17, T.Q5_K),
        FileType("Q6_K", 18, T.Q6_K),
        FileType("Q8_0", 7, T.Q8_0),
        FileType("F16", 1, T.F16),
        FileType("BF16", 32, T.BF16),
        FileType("F32", 0, T.F32),
        FileType("COPY", 0, T.F32),  # general.file_type: the input's (its key, or the guess llama.cpp makes)
        # Q3_K_S's choices with every Q3_K tensor stored as Q3_K_HIFI (general.file_type = the type id)
        FileType("Q3_K_HIFI", int(HIFI_TYPE_ID), T.Q3_K, rules="Q3_K_S", substitutes=((T.Q3_K, HIFI_TYPE_ID),)),
    )
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
UNQUANTIZED = frozenset({T.F32, T.F16, T.BF16})
LLAMA_LIST_ORDER = ["Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                    "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M",
                    "Q3_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S",
                    "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "COPY"]


def _by_llama_name(name: str) -> FileType:
    return FILE_TYPES[ALIASES.get(name, name)]


def parse_file_type(text: str) -> FileType:
    """A file type by name (any case, llama-quantize's aliases) or by its LLAMA_FTYPE number; a number
    means the first entry of llama-quantize's list with it (`try_parse_ftype`: 12 is Q3_K, 0 is F32)."""
    key = text.upper()
    if key in FILE_TYPES or key in ALIASES:
        return _by_llama_name(key)
    for name in [*LLAMA_LIST_ORDER, *FILE_TYPES]:
        if str(_by_llama_name(name).ftype) == text.strip():
            return _by_llama_name(name)
    names = ", ".join([*FILE_TYPES, *ALIASES])
    raise ImatrixError(f"unknown quantization type '{text}' (choose from {names})")


def looks_like_file_type(text: str) -> bool:
    """Whether llama-quantize reads `text` as a file type (`try_parse_ftype`): it then takes `<input> <type>`
    to mean the output's name is made up."""
    try:
        parse_file_type(text)
    except ImatrixError:
        return False
    return True


def llama_cpp_type_name(text: str) -> str:
    """The name llama-quantize gives the file type `text`: the first entry of its list that matches,
    where the aliases (Q4_K for Q4_K_M, ...) come before the names they stand for."""
    upper = text.upper()
    if upper in FILE_TYPES or upper in ALIASES:
        return upper
    ft = parse_file_type(text)
    return next((name for name in LLAMA_LIST_ORDER if _by_llama_name(name) == ft), ft.name)


def parse_tensor_type(text: str) -> enum.IntEnum:
    """A tensor type by its ggml name in any case (`q8_0`, `Q6_K`), or a registered project type."""
    known: dict[str, enum.IntEnum] = {q.name: q for q in NewGGMLType}
    known.update({q.name: q for q in QType})
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
NEVER_QUANTIZED_BY_ARCH = {
    "glm5-next": (
        "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
        "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
        "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
    ),
}


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    dims = [int(n) for n in shape]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return len(dims)


def allows_quantization(name: str, shape: Sequence[int], leave_output_tensor: bool = False, arch: str = "") -> bool:
    """Only 2-D and 3-D `*weight` tensors, minus norms, routers, position embeddings and tiny tables."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    if name in NEVER_QUANTIZED_NAMES:
        return False
    never = (*NEVER_QUANTIZED, *NEVER_QUANTIZED_BY_ARCH.get(arch, ()))
    return not any(part in name for part in never)


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
    """The layer a name starts with (`sscanf(name, "blk.%d.")`), -1 for none."""
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
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0
    fallback_notes: list[str] = field(default_factory=list)
    override_notes: list[str] = field(default_factory=list)  # --tensor-type's "applying manual override" lines


Rule = Callable[[MixState, int, int], "enum.IntEnum | None"]


def _gqa4(upgrade: QType) -> Rule:
    return lambda s, i, n: upgrade if s.model.n_gqa >= 4 else None


ATTN_V_RULES: dict[str, Rule] = {
    "Q2_K": lambda s, i, n: T.Q4_K if s.model.n_gqa >= 4 else T.Q3_K,
    "Q2_K_S": _gqa4(T.Q4_K),
    "IQ3_XXS": lambda s, i, n: T.Q4_K if s.model.n_gqa >= 4 else T.IQ3_S if not s.has_imatrix else T.IQ3_XXS,
    "IQ3_XS": _gqa4(T.Q4_K),
    "IQ3_S": _gqa4(T.Q4_K),
    "IQ3_M": lambda s, i, n: T.Q4_K,
    "Q3_K_M": lambda s, i, n: T.Q5_K if i < 2 else T.Q4_K,
    "Q3_K_L": lambda s, i, n: T.Q5_K,
    "IQ4_NL": _gqa4(T.Q5_K),
    "IQ4_XS": _gqa4(T.Q5_K),
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


def _iq3_m_ffn_down(s: MixState, i: int, n: int) -> QType | None:
    return T.Q4_K if i < n // 8 or (s.model.n_expert == 8 and use_more_bits(i, n)) else None


FFN_DOWN_RULES: dict[str, Rule] = {
    "Q2_K": lambda s, i, n: T.Q3_K,
    "Q2_K_S": lambda s, i, n: T.Q4_K if i < n // 8 else None,
    "IQ3_XXS": lambda s, i, n: None if s.has_imatrix else T.Q4_K if i < n // 8 else T.Q3_K,
    "Q3_K_M": _q3_k_m_ffn_down,
    "IQ3_M": _iq3_m_ffn_down,
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


def _iq3_xs_middle(s: MixState, i: int, n: int) -> QType | None:
    return T.IQ3_XXS if n // 8 <= i < 7 * n // 8 else None


FFN_GATE_UP_RULES: dict[str, Rule] = {"IQ3_XS": _iq3_xs_middle}
ATTN_Q_RULES = {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}  # attn_k too, unless the model has 8 experts
ATTN_OUTPUT_RULES = {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_M": T.Q4_K}
ATTN_OUTPUT_FALCON_RULES = {"Q3_K_L": T.Q4_K}
ATTN_OUTPUT_8_EXPERTS = frozenset({"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                                   "IQ3_S", "IQ3_M", "IQ4_XS"})


def _layer(s: MixState, counter: str, name: str) -> tuple[int, int]:
    """(layer, n_layer) of an ffn tensor, counting the category's tensors as they come (llama.cpp's
    `layer_info`); then the next one. MoE expert tensors are not in layer order, so theirs is in the name."""
    i_layer, n_layer = getattr(s, counter), s.model.n_layer
    setattr(s, counter, i_layer + 1)
    if s.model.n_expert > 1:
        i_layer = block_index(name)
        if i_layer < 0:
            raise ImatrixError(f"failed to determine the layer of tensor {name}")
        if i_layer >= n_layer:
            raise ImatrixError(f"bad layer {i_layer} for tensor {name}: must be in [0, {n_layer})")
    return i_layer, n_layer


def _attn_v(s: MixState, rules: str, new: enum.IntEnum, name: str) -> enum.IntEnum:
    rule = ATTN_V_RULES.get(rules)
    chosen = rule(s, s.i_attention_wv, s.model.n_attention_wv) if rule else None
    if chosen is not None:
        new = chosen
    if s.model.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K
    if s.model.n_expert == 8:
        new = T.Q8_0
    s.i_attention_wv += 1
    return new


def _ffn(counter: str, rules_by_ftype: dict[str, Rule]) -> Callable[..., enum.IntEnum]:
    def rule(s: MixState, rules: str, new: enum.IntEnum, name: str) -> enum.IntEnum:
        i_layer, n_layer = _layer(s, counter, name)
        chosen = rules_by_ftype[rules](s, i_layer, n_layer) if rules in rules_by_ftype else None
        return new if chosen is None else chosen

    return rule


def _attn_output(s: MixState, rules: str, new: enum.IntEnum, name: str) -> enum.IntEnum:
    if s.model.falcon:
        return ATTN_OUTPUT_FALCON_RULES.get(rules, new)
    if s.model.n_expert == 8:
        return T.Q5_K if rules in ATTN_OUTPUT_8_EXPERTS else new
    return ATTN_OUTPUT_RULES.get(rules, new)


def _attn_k(s: MixState, rules: str, new: enum.IntEnum, name: str) -> enum.IntEnum:
    return T.Q8_0 if s.model.n_expert == 8 else ATTN_Q_RULES.get(rules, new)


def _attn_q(s: MixState, rules: str, new: enum.IntEnum, name: str) -> enum.IntEnum:
    return ATTN_Q_RULES.get(rules, new)


# ATTN_QKV and ATTN_KV_B go through the attn_v rule: llama_tensor_get_type_impl tests attn_v-likeness
# first, so its separate attn_qkv branch is never reached.
CATEGORY_RULES = {
    **{cat: _attn_v for cat in ATTN_V_LIKE},
    Cat.FFN_DOWN: _ffn("i_ffn_down", FFN_DOWN_RULES),
    Cat.FFN_GATE: _ffn("i_ffn_gate", FFN_GATE_UP_RULES),
    Cat.FFN_UP: _ffn("i_ffn_up", FFN_GATE_UP_RULES),
    Cat.ATTN_OUTPUT: _attn_output,
    Cat.ATTN_K: _attn_k,
    Cat.ATTN_Q: _attn_q,
}

# The 1-2 bit i-quant mixes have a branch of their own in llama_tensor_get_type_impl.
LOW_BIT_IQ = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
IQ2_S_OR_M = frozenset({"IQ2_S", "IQ2_M"})
IQ1 = frozenset({"IQ1_S", "IQ1_M"})


def _low_bit_iq(s: MixState, rules: str, cat: Cat, new: enum.IntEnum) -> enum.IntEnum:
    fewer_bits = T.IQ3_S if rules in IQ2_S_OR_M else T.Q2_K
    if cat in ATTN_V_LIKE:
        s.i_attention_wv += 1
        return T.Q4_K if s.model.n_gqa >= 4 or s.model.n_expert >= 4 else fewer_bits
    if cat == Cat.ATTN_K and s.model.n_expert == 8:
        return T.Q4_K
    if cat == Cat.FFN_DOWN:
        # this branch compares the running count with the layer count, even for experts
        s.i_ffn_down += 1
        return fewer_bits if s.i_ffn_down - 1 < s.model.n_layer // 8 else new
    if cat == Cat.ATTN_OUTPUT:
        if s.model.n_expert == 8:
            return T.Q5_K
        return T.IQ2_XXS if rules in IQ1 else T.IQ3_S if rules in IQ2_S_OR_M else new
    return new


# --- the output and embedding tables, and MXFP4_MOE ---

OUTPUT_Q5_K = frozenset({"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
UNTIED_TOKEN_EMBD = {
    "IQ2_XXS": T.Q2_K, "IQ2_XS": T.Q2_K, "IQ1_S": T.Q2_K, "IQ1_M": T.Q2_K,
    "IQ2_S": T.IQ3_S, "IQ2_M": T.IQ3_S, "IQ3_XXS": T.IQ3_S,
    "TQ1_0": T.Q4_K, "TQ2_0": T.Q4_K, "Q2_0": T.Q4_K,
}
# glm5-next keeps these at Q8_0 or better whatever the mix says
AT_LEAST_Q8_0 = {"glm5-next": ("attn_q_a", "attn_q_b", "nextn.eh_proj")}
EXPERT_CATEGORIES = frozenset({Cat.FFN_UP, Cat.FFN_GATE, Cat.FFN_DOWN})


@dataclass(frozen=True)
class Overrides:
    output_tensor_type: enum.IntEnum | None = None
    token_embedding_type: enum.IntEnum | None = None
    pure: bool = False
    # --tensor-type: (regex on the tensor name, type), the first that matches wins
    tensor_types: tuple[tuple[re.Pattern[str], enum.IntEnum], ...] = ()
    only_copy: bool = False  # the COPY file type: no tensor is quantized

    def manual_type(self, name: str) -> enum.IntEnum | None:
        return next((qtype for pattern, qtype in self.tensor_types if pattern.search(name)), None)


def _output_type(s: MixState, rules: str, new: enum.IntEnum, n_cols: int, ov: Overrides) -> enum.IntEnum:
    if ov.output_tensor_type is not None:
        return ov.output_tensor_type
    if rules == "MXFP4_MOE" or s.model.falcon or n_cols % block_size(new):
        return T.Q8_0
    if rules in OUTPUT_Q5_K:
        return T.Q5_K
    return new if new == T.Q8_0 else T.Q6_K


def _mxfp4_moe(s: MixState, cat: Cat, shape: Sequence[int]) -> enum.IntEnum:
    """MoE expert tensors (3-D) as MXFP4, everything else Q8_0 (bailingmoe3's 3-D MLA projections too)."""
    is_experts = len(shape) > 2 and int(shape[2]) > 1
    if s.model.arch == "bailingmoe3" and cat not in EXPERT_CATEGORIES:
        is_experts = False
    return T.MXFP4 if is_experts else T.Q8_0


def _mixed_type(s: MixState, ft: FileType, name: str, shape: Sequence[int], ov: Overrides) -> enum.IntEnum:
    """llama_tensor_get_type_impl: the mix's type for one tensor."""
    cat, rules, new = category(name), ft.rules_name, ft.default
    if any(part in name for part in AT_LEAST_Q8_0.get(s.model.arch, ())) and new not in UNQUANTIZED:
        return T.Q8_0
    if cat == Cat.OUTPUT or (cat == Cat.TOKEN_EMBD and s.model.tied_embeddings):
        return _output_type(s, rules, new, int(shape[0]), ov)
    if rules == "MXFP4_MOE":
        return _mxfp4_moe(s, cat, shape)
    if cat == Cat.TOKEN_EMBD:
        return UNTIED_TOKEN_EMBD.get(rules, new)
    if rules in LOW_BIT_IQ:
        return _low_bit_iq(s, rules, cat, new)
    rule = CATEGORY_RULES.get(cat)
    return rule(s, rules, new, name) if rule else new


# target type -> the 32-block type used when a row is not a whole number of blocks
FALLBACKS: dict[enum.IntEnum, enum.IntEnum] = {
    T.IQ4_XS: T.IQ4_NL,
    T.IQ3_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL,
    T.IQ2_S: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL,
    T.IQ2_XXS: T.IQ4_NL,
    T.IQ1_M: T.IQ4_NL,
    T.IQ1_S: T.IQ4_NL,
    Q2_0: T.Q4_0,
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
        raise ImatrixError(f"{name}: no tensor type fallback is defined for type {type_name(target)} "
                           f"({n_cols} columns)")
    if n_cols % block_size(chosen):
        note += "(WARNING: must use F16 due to unusual shape) "
        chosen = T.F16
    note += f"-> falling back to {type_name(chosen):>7}"
    s.fallback_notes.append(note)
    return chosen


def choose_type(
    s: MixState, ft: FileType, name: str, shape: Sequence[int], current: enum.IntEnum, ov: Overrides
) -> enum.IntEnum:
    """The type `name` (ggml shape `shape`, now of type `current`) gets in file type `ft` (llama_tensor_get_type).

    Call once per tensor in `llama_order`: the attn_v and ffn rules count tensors as they go.
    """
    if ov.only_copy or not allows_quantization(name, shape, arch=s.model.arch):
        return current
    cat = category(name)
    manual = ov.manual_type(name)
    # per_layer_token_embd follows --token-embedding-type unless a --tensor-type pattern names it
    named = manual is not None and name == "per_layer_token_embd.weight"
    if ov.token_embedding_type is not None and cat == Cat.TOKEN_EMBD and not named:
        return _fitting_override(name, shape, ov.token_embedding_type, "--token-embedding-type")
    if ov.output_tensor_type is not None and cat == Cat.OUTPUT:
        return _fitting_override(name, shape, ov.output_tensor_type, "--output-tensor-type")
    if ft.default in UNQUANTIZED:  # llama.cpp applies neither the mix nor --tensor-type then
        return ft.default
    n_cols = int(shape[0])
    if manual is not None:  # kept as named: not the mix, and not a file type's substitute either
        if manual != ft.default:
            s.override_notes.append(f"llama_tensor_get_type: {name:<36} - applying manual override: "
                                    f"{type_name(ft.default)} -> {type_name(manual)}")
        return fallback(s, name, n_cols, manual)
    chosen = ft.default if ov.pure else _mixed_type(s, ft, name, shape, ov)
    chosen = fallback(s, name, n_cols, chosen)
    return dict(ft.substitutes).get(chosen, chosen)


def _fitting_override(name: str, shape: Sequence[int], qtype: enum.IntEnum, flag: str) -> enum.IntEnum:
    """A type asked for by name: it must fit the rows, there is no fallback to choose (llama.cpp fails too)."""
    block = type_sizes(qtype)[0]
    if int(shape[0]) % block:
        raise ImatrixError(f"{flag} {type_name(qtype)}: {name} has rows of {int(shape[0])} values, not a multiple "
                           f"of its {block}-value blocks")
    return qtype


# --- which results need an imatrix (llama.cpp: tensor_requires_imatrix) ---

IMATRIX_REQUIRED = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})
NEVER_REQUIRE_IMATRIX = frozenset({"token_embd.weight", "per_layer_token_embd.weight", "output.weight"})
Q2_K_S_FTYPE = 21


def requires_imatrix(name: str, qtype: enum.IntEnum, ft: FileType) -> bool:
    """Whether llama-quantize refuses to make tensor `name` of type `qtype` without an imatrix: the 1-3 bit
    i-quants, and Q2_K in a Q2_K_S file; never the embeddings or the output."""
    if name in NEVER_REQUIRE_IMATRIX:
        return False
    return qtype in IMATRIX_REQUIRED or (qtype == T.Q2_K and ft.ftype == Q2_K_S_FTYPE)


def plan_types(
    ft: FileType,
    tensors: Sequence[tuple[str, Sequence[int], enum.IntEnum]],
    metadata: dict[str, object],
    overrides: Overrides = Overrides(),
    has_imatrix: bool = False,
    leave_output_tensor: bool = False,
    order: Sequence[str] | None = None,
) -> tuple[dict[str, enum.IntEnum], MixState]:
    """Types for `(name, ggml shape, current type)` tensors, visited in `order` (default: llama.cpp's)."""
    by_name = {name: (shape, current) for name, shape, current in tensors}
    state = MixState(model_facts(metadata, list(by_name)), has_imatrix=has_imatrix)
    chosen: dict[str, enum.IntEnum] = {}
    for name in order if order is not None else llama_order(by_name):
        shape, current = by_name[name]
        if leave_output_tensor and name == "output.weight":
            chosen[name] = current
            continue
        chosen[name] = choose_type(state, ft, name, shape, current, overrides)
    return chosen, state
