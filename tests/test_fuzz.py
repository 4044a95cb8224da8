"""Fuzzing the readers: a mutated imatrix file, model file or quantize source either loads as valid data or
fails with one `ImatrixError`, within a time and a memory budget; never a traceback, a hang or garbage.

Mutations hit the part of a file that is parsed (a GGUF header, a whole .dat): flipped bits, bytes set to
extremes, 8-byte counts and offsets set to huge or small values, truncation. Each case runs under an
alarm and a cap on the address space the process may add, so a reader that trusted a length fails the
test instead of the machine.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imatrix import ImatrixError, ImportanceMatrix
from imatrix.formats import load_imatrix
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.loader import load_model
from imatrix.quant.model import quantize_model

TINY_MODEL = Path(__file__).resolve().parent / "architectures" / "llama" / "model.gguf"
SECONDS_PER_CASE = 20
EXTRA_BYTES_PER_CASE = 1 << 30
EXTREME_U64 = (0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1)


@contextlib.contextmanager
def budget(seconds: int = SECONDS_PER_CASE, extra_bytes: int = EXTRA_BYTES_PER_CASE) -> Iterator[None]:
    """Fail a case that runs longer than `seconds` or maps more than `extra_bytes` beyond what the process has."""

    def timed_out(signum: int, frame: object) -> None:
        raise TimeoutError(f"a case ran past {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = _address_space()
    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(seconds)
    if in_use:
        resource.setrlimit(resource.RLIMIT_AS, (min(in_use + extra_bytes, hard) if hard > 0 else in_use + extra_bytes,
                                                hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@st.composite
def mutations(draw: st.DrawFn, parsed_bytes: int) -> list[tuple[str, int, int]]:
    """A few edits within the first `parsed_bytes` bytes: (kind, position, value)."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["bit", "byte", "u64", "truncate"]))
        position = draw(st.integers(0, parsed_bytes - 1))
        value = draw(st.sampled_from(EXTREME_U64)) if kind == "u64" else draw(st.integers(0, 255))
        edits.append((kind, position, value))
    return edits


def mutated(original: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(original)
    for kind, position, value in edits:
        if position >= len(data):  # cut off by an earlier truncation
            continue
        if kind == "bit":
            data[position] ^= 1 << (value % 8)
        elif kind == "byte":
            data[position] = value
        elif kind == "u64":
            data[position : position + 8] = struct.pack("<Q", value)[: len(data) - position]
        else:
            del data[position:]
    return bytes(data)


def gguf_header_bytes(path: Path) -> int:
    """Where a valid GGUF file's tensor data begin: everything before is parsed."""
    return min(info.offset for info in GGUFModelFile(path).tensors.values())


def loads_or_fails_cleanly(load: Callable[[Path], object], path: Path, check: Callable[[object], None]) -> str:
    with budget():
        try:
            loaded = load(path)
        except ImatrixError as error:
            message = str(error)
            assert "\n" not in message and str(path) in message, message
            return _tallied("refused")
    check(loaded)
    return _tallied("loaded")


def _tallied(outcome: str) -> str:
    """With IMATRIX_FUZZ_TALLY=<file>, each case's test and outcome is appended there (docs/reliability.md's
    figures come from a run with IMATRIX_FUZZ_SCALE=10)."""
    tally = os.environ.get("IMATRIX_FUZZ_TALLY")
    if tally:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(tally, "a") as handle:
            handle.write(f"{test}\t{outcome}\n")
    return outcome


def valid_statistics(matrix: object) -> None:
    assert isinstance(matrix, ImportanceMatrix)
    for name in matrix:
        stats = matrix[name]
        assert np.isfinite(stats.sums).all() and (stats.sums >= 0).all(), name
        assert (stats.counts >= 0).all(), name


# IMATRIX_FUZZ_SCALE=10 runs ten times the cases (CI runs the default, with fixed seeds: see conftest.py)
SCALE = float(os.environ.get("IMATRIX_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=round(examples * SCALE), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


FUZZ = fuzz_settings(150)


@pytest.mark.parametrize("golden_file", ["imatrix/smollm2-f16.c512.n40.imatrix.gguf",
                                         "moe/tiny-qwen3moe.c256.n8.imatrix.gguf"])
@FUZZ
@given(data=st.data())
def test_imatrix_gguf(golden: Path, golden_file: str, tmp_path: Path, data: st.DataObject) -> None:
    original = (golden / golden_file).read_bytes()
    edits = data.draw(mutations(gguf_header_bytes(golden / golden_file)))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(mutated(original, edits))
    loads_or_fails_cleanly(load_imatrix, path, valid_statistics)


@FUZZ
@given(data=st.data())
def test_imatrix_dat(golden: Path, tmp_path: Path, data: st.DataObject) -> None:
    original = (golden / "imatrix/smollm2-f16.c512.n40.imatrix.dat").read_bytes()
    # the first entries and the trailer (chunk count, dataset name) are where lengths live
    edits = data.draw(mutations(4096)) if data.draw(st.booleans()) else [
        (kind, len(original) - 1 - position % 64, value) for kind, position, value in data.draw(mutations(64))]
    path = tmp_path / "fuzzed.dat"
    path.write_bytes(mutated(original, edits))
    loads_or_fails_cleanly(load_imatrix, path, valid_statistics)


def runs(loaded: object) -> None:
    assert loaded.model is not None


@fuzz_settings(60)
@given(data=st.data())
def test_model_header(tmp_path: Path, data: st.DataObject) -> None:
    original = TINY_MODEL.read_bytes()
    edits = data.draw(mutations(gguf_header_bytes(TINY_MODEL)))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(mutated(original, edits))
    loads_or_fails_cleanly(load_model, path, runs)


def numeric_fields(path: Path) -> list[tuple[str, int, str]]:
    """(key, where its value is stored, struct format) of every scalar number in a GGUF's metadata."""
    formats = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
               "FLOAT32": "<f", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d"}
    data = path.read_bytes()
    fields = []
    for key, field in GGUFModelFile(path).fields.items():
        if field.value_type.name in formats:
            stored = struct.pack("<Q", len(key.encode())) + key.encode()
            fields.append((key, data.find(stored) + len(stored) + 4, formats[field.value_type.name]))
    return fields


EXTREME_NUMBERS = (0, 1, 3, 17, 2**15, 2**20, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1, float("nan"), float("inf"), 1e30)


@fuzz_settings(60)
@given(data=st.data())
def test_model_hyperparameters(tmp_path: Path, data: st.DataObject) -> None:
    """A hyperparameter (a scalar in the metadata) set to an extreme: header mutations rarely hit one."""
    original = bytearray(TINY_MODEL.read_bytes())
    for _ in range(data.draw(st.integers(1, 2))):
        key, at, fmt = data.draw(st.sampled_from(numeric_fields(TINY_MODEL)))
        value = data.draw(st.sampled_from(EXTREME_NUMBERS))
        if fmt in ("<f", "<d"):
            struct.pack_into(fmt, original, at, float(value))
        elif not isinstance(value, float):
            struct.pack_into(fmt[0] + fmt[1].upper(), original, at, value % 2 ** (8 * struct.calcsize(fmt)))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(original)
    loads_or_fails_cleanly(load_model, path, runs)


@fuzz_settings(40)
@given(data=st.data())
def test_quantize_source(tmp_path: Path, data: st.DataObject) -> None:
    original = TINY_MODEL.read_bytes()
    edits = data.draw(mutations(gguf_header_bytes(TINY_MODEL)))
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(mutated(original, edits))

    def quantize(source: Path) -> Path:
        out = tmp_path / "out.gguf"
        out.unlink(missing_ok=True)
        quantize_model(source, out, "Q8_0", n_threads=1, log=lambda *_: None)
        return out

    loads_or_fails_cleanly(quantize, path, lambda out: GGUFModelFile(out))


def test_a_gguf_without_tensors_parses(tmp_path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    writer.add_string("general.name", "vocabulary only")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GGUFModelFile(tmp_path / "vocab.gguf").tensors == {}
    with pytest.raises(ImatrixError, match="vocab.gguf: a model, not an imatrix"):
        load_imatrix(tmp_path / "vocab.gguf")
