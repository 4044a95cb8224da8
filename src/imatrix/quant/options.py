"""llama-quantize's options as one value, and the parsers of their texts with llama-quantize's rules.

`QuantizeOptions` has one field per flag, named as its long form (`--tensor-type` is `tensor_type`),
holding the flag's text(s) as given on the command line; `quantize_model` parses and checks them
before it reads a tensor. The parsers follow tools/quantize/quantize.cpp and common/common.cpp
(`parse_tensor_type`, `parse_layer_prune`, `string_parse_kv_override`, `--max-buffer-size`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from imatrix.errors import ImatrixError

VT = gguf.GGUFValueType
MiB = 1024 * 1024
MAX_KV_KEY = 127  # llama_model_kv_override.key is char[128]
MAX_KV_STRING = 127  # and val_str too
DEFAULT_MAX_BUFFER_MIB = 8192  # LLAMA_QUANT_MAX_BUF_SIZE


@dataclass(frozen=True)
class QuantizeOptions:
    """llama-quantize's flags (and its positional nthreads); see `imatrix quantize --help`."""

    imatrix: str | None = None  # the file: read unless quantize_model gets the matrix, and recorded in the output
    include_weights: Sequence[str] = ()
    exclude_weights: Sequence[str] = ()
    output_tensor_type: str | enum.IntEnum | None = None
    token_embedding_type: str | enum.IntEnum | None = None
    # NAME=TYPE texts in command-line order, --tensor-type-file's entries where that flag stood
    tensor_type: Sequence[str] = ()
    prune_layers: Sequence[int] = ()
    keep_split: bool = False
    override_kv: Sequence[str] = ()  # KEY=TYPE:VALUE texts
    dry_run: bool = False
    max_buffer_size: int = DEFAULT_MAX_BUFFER_MIB  # MiB of one tensor's rows held at a time
    allow_requantize: bool = False
    pure: bool = False
    leave_output_tensor: bool = False
    strict_imatrix: bool = False  # ours: refuse imatrix rows that would quantize a tensor to zeros
    n_threads: int | None = None


# --- --tensor-type ---


def parse_tensor_type_option(text: str) -> tuple[str, enum.IntEnum]:
    """`NAME=TYPE` to (the lower-cased name, a regex searched in tensor names; the ggml type)."""
    from imatrix.quant.mixes import parse_tensor_type

    name, sep, type_text = text.partition("=")
    if not sep:
        raise ImatrixError(f"--tensor-type: malformed tensor type '{text}' (expected NAME=TYPE)")
    if not name:
        raise ImatrixError(f"--tensor-type '{text}': missing tensor name")
    if not type_text:
        raise ImatrixError(f"--tensor-type '{text}': missing quantization type")
    try:
        qtype = parse_tensor_type(type_text)
    except ImatrixError:
        raise ImatrixError(f"--tensor-type '{text}': invalid quantization type '{type_text}'") from None
    return name.lower(), qtype


def tensor_type_patterns(texts: Sequence[str]) -> tuple[tuple[re.Pattern[str], enum.IntEnum], ...]:
    """Compiled `--tensor-type` options, in order (llama.cpp takes the first pattern that matches)."""
    patterns = []
    for text in texts:
        name, qtype = parse_tensor_type_option(text)
        try:
            patterns.append((re.compile(name), qtype))
        except re.error as exc:
            raise ImatrixError(f"--tensor-type '{text}': invalid regular expression: {exc}") from None
    return tuple(patterns)


def read_tensor_type_file(path: str | Path) -> list[str]:
    """The `NAME=TYPE` entries of a --tensor-type-file, separated by spaces or newlines."""
    try:
        entries = Path(path).read_text(encoding="utf-8", errors="replace").split()
    except OSError as exc:
        raise ImatrixError(f"--tensor-type-file {path}: cannot read: {exc.strerror or exc}") from None
    for entry in entries:
        parse_tensor_type_option(entry)
    return entries


# --- --prune-layers ---

_LEADING_INT = re.compile(r"\s*([+-]?\d+)")


def parse_prune_layers(text: str) -> tuple[int, ...]:
    """`L0,L1,...` to sorted distinct layer numbers (std::stoi reads each entry's leading integer)."""
    layers = set()
    for entry in text.split(","):
        match = _LEADING_INT.match(entry)
        if match is None or int(match.group(1)) < 0:
            raise ImatrixError(f"--prune-layers: invalid layer id '{entry}'")
        layers.add(int(match.group(1)))
    return tuple(sorted(layers))


# --- --override-kv ---


@dataclass(frozen=True)
class KvOverride:
    key: str
    kind: str  # int, float, bool or str
    value: int | float | bool | str

    def stored(self) -> tuple[object, VT]:
        """The value and GGUF type llama-quantize writes: an int as uint32 of its magnitude, a float as float32."""
        if self.kind == "int":
            return abs(int(self.value)) % 2**32, VT.UINT32
        if self.kind == "float":
            return float(self.value), VT.FLOAT32
        if self.kind == "bool":
            return bool(self.value), VT.BOOL
        return str(self.value), VT.STRING


_FLOAT_PREFIX = re.compile(r"\s*([+-]?(?:inf(?:inity)?|nan|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?))", re.IGNORECASE)


def parse_override_kv(text: str) -> KvOverride:
    """`KEY=TYPE:VALUE` with TYPE int, float, bool or str, read as common's `string_parse_kv_override`
    reads it (numbers by their leading digits, as atol/atof do)."""
    key, sep, rest = text.partition("=")
    if not sep or not key or len(key) > MAX_KV_KEY:
        raise ImatrixError(f"--override-kv: malformed KV override '{text}' (expected KEY=TYPE:VALUE)")
    kind, colon, value = rest.partition(":")
    if not colon or kind not in ("int", "float", "bool", "str"):
        raise ImatrixError(f"--override-kv: invalid type for KV override '{text}' (int, float, bool or str)")
    if kind == "int":
        match = _LEADING_INT.match(value)
        return KvOverride(key, kind, int(match.group(1)) if match else 0)
    if kind == "float":
        match = _FLOAT_PREFIX.match(value)
        return KvOverride(key, kind, float(match.group(1)) if match else 0.0)
    if kind == "bool":
        if value not in ("true", "false"):
            raise ImatrixError(f"--override-kv: invalid boolean value for KV override '{text}'")
        return KvOverride(key, kind, value == "true")
    if len(value.encode("utf-8")) > MAX_KV_STRING:
        raise ImatrixError(f"--override-kv: malformed KV override '{text}', value cannot exceed 127 chars")
    return KvOverride(key, kind, value)


# --- --max-buffer-size ---


def parse_max_buffer_size(text: str) -> int:
    """MiB as atoi reads them (leading digits); not positive is refused."""
    match = _LEADING_INT.match(text)
    mib = int(match.group(1)) if match else 0
    if mib <= 0:
        raise ImatrixError(f"invalid --max-buffer-size '{text}'")
    return mib
