"""Issue 17's repros as regression tests: bad input ends in one clean line, and interruptions (kill -9,
SIGTERM, a killed worker, a full disk, a second writer) leave the previous output or none, never garbage.

The interruption tests run the command in a subprocess that a hook pauses at a known point (inside a save,
with its temporary file written; inside a quantize worker's span), then signal it there.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from imatrix import ImatrixError, ImportanceMatrix
from imatrix.cli.main import main
from imatrix.errors import ImatrixWarning
from imatrix.formats import load_imatrix, save_imatrix
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.pipeline.chunks import read_calibration_text

TINY_MODEL = Path(__file__).resolve().parent / "architectures" / "llama" / "model.gguf"
C512 = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
SECONDS_TO_PAUSE = 180  # how long a hooked subprocess may take to reach its pause (imports, model load)


def ends_in_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str) -> str:
    """The command fails with exit code 1 and one `imatrix: error:` line, its last, matching `pattern`."""
    assert main([str(arg) for arg in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("imatrix: error: ")]
    assert errors == err[-1:] and "Traceback" not in "\n".join(err), err
    assert re.search(pattern, err[-1]), err[-1]
    return err[-1]


# --- crafted files ---


def length_prefixed(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def edited(source: Path, target: Path, edit: Callable[[bytearray], None]) -> Path:
    data = bytearray(source.read_bytes())
    edit(data)
    target.write_bytes(data)
    return target


def tensor_info_at(data: bytearray, name: str) -> tuple[int, int]:
    """(where the tensor's first dimension is stored, its number of dimensions) in a GGUF header."""
    at = data.find(length_prefixed(name)) + len(length_prefixed(name))
    return at + 4, struct.unpack_from("<I", data, at)[0]


def set_dimension(name: str, dim: int, factor: float) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        at = tensor_info_at(data, name)[0] + 8 * dim
        struct.pack_into("<Q", data, at, int(struct.unpack_from("<Q", data, at)[0] * factor))
    return edit


def offset_at(data: bytearray, name: str) -> int:
    at, n_dims = tensor_info_at(data, name)
    return at + 8 * n_dims + 4


def set_offset(name: str, like: str | None = None, plus: int = 0) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        value = struct.unpack_from("<Q", data, offset_at(data, like or name))[0] + plus
        struct.pack_into("<Q", data, offset_at(data, name), value)
    return edit


def set_vocabulary_string_length(value: int) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        key = length_prefixed("tokenizer.ggml.tokens")
        first_string = data.find(key) + len(key) + 4 + 4 + 8  # value type, item type, count
        struct.pack_into("<Q", data, first_string, value)
    return edit


def set_metadata(key: str, value: float, fmt: str = "<I") -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        struct.pack_into(fmt, data, data.find(length_prefixed(key)) + len(length_prefixed(key)) + 4, value)
    return edit


def with_statistics(golden: Path, target: Path, name: str, sums: Callable[[int], np.ndarray] | None = None,
                    counts: list[float] | None = None) -> Path:
    """llama.cpp's SmolLM2 imatrix with one tensor's stored sums or counts replaced."""
    source = golden / C512
    tensors = GGUFModelFile(source).tensors

    def edit(data: bytearray) -> None:
        for suffix, values in ((".in_sum2", sums), (".counts", counts)):
            if values is not None:
                info = tensors[name + suffix]
                stored = values(info.n_bytes // 4) if callable(values) else values
                data[info.offset : info.offset + info.n_bytes] = np.asarray(stored, dtype="<f4").tobytes()

    return edited(source, target, edit)


def raw_imatrix(target: Path, tensors: dict[str, object], duplicate_key: bool = False) -> Path:
    writer = gguf.GGUFWriter(target, arch="")
    writer.kv_data[0].clear()
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", ["x.txt"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 512)
    if duplicate_key:
        writer.add_uint32("imatrix.chunk_sizX", 512)  # renamed below: gguf-py refuses a duplicate
    for name, values in tensors.items():
        writer.add_tensor(name, np.asarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if duplicate_key:
        target.write_bytes(target.read_bytes().replace(b"imatrix.chunk_sizX", b"imatrix.chunk_size"))
    return target


def legacy_dat(target: Path, entries: list[tuple[bytes, int, np.ndarray]]) -> Path:
    data = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        data += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, len(values))
        data += np.asarray(values, dtype="<f4").tobytes()
    target.write_bytes(data + struct.pack("<ii", 1, 1) + b"x")
    return target


# --- the issue's repros: each ends in one line naming the file ---

Q = "blk.0.attn_q.weight"


def flipped_type_byte(golden: Path, tmp: Path) -> Path:
    """One flipped bit: a string key's type becomes ARRAY, and a reader that trusts the length it then
    reads allocates without end (gguf-py grew ~150 MB/s)."""
    return edited(golden / C512, tmp / "flipped.gguf", lambda data: data.__setitem__(44, 0x09))


IMATRIX_REPROS = {
    "flipped bit": (flipped_type_byte, r"flipped\.gguf: corrupt GGUF file at byte \d+: metadata 'general\.type' "
                                       r"claims \d+ items"),
    "duplicated key": (lambda g, t: raw_imatrix(t / "dup.gguf", {Q + ".in_sum2": np.ones(8), Q + ".counts": [1]},
                                                duplicate_key=True),
                       r"dup\.gguf: corrupt GGUF file at byte \d+: metadata key 'imatrix\.chunk_size' appears twice"),
    "inf sum": (lambda g, t: with_statistics(g, t / "inf.gguf", Q, sums=lambda n: np.r_[np.inf, np.ones(n - 1)]),
                rf"inf\.gguf: tensor '{Q}' has sums that are NaN or infinite"),
    "nan sums": (lambda g, t: with_statistics(g, t / "nan.gguf", Q, sums=lambda n: np.full(n, np.nan)),
                 rf"nan\.gguf: tensor '{Q}' has sums that are NaN or infinite"),
    "negative sum": (lambda g, t: with_statistics(g, t / "neg.gguf", Q, sums=lambda n: -np.ones(n)),
                     rf"neg\.gguf: tensor '{Q}' has negative sums of squares"),
    "count 0.4": (lambda g, t: with_statistics(g, t / "frac.gguf", Q, counts=[0.4]),
                  rf"frac\.gguf: tensor '{Q}' has token counts that are not whole numbers"),
    "576 sums, 2 counts": (lambda g, t: raw_imatrix(t / "two.gguf", {Q + ".in_sum2": np.ones(576),
                                                                    Q + ".counts": [512.0, 512.0]}),
                           rf"two\.gguf: tensor '{Q}' has 1 matrices of sums but 2 counts"),
    "dat negative count": (lambda g, t: legacy_dat(t / "neg.dat", [(Q.encode(), -3, np.ones(576))]),
                           rf"neg\.dat: entry '{Q}' has call counts that are negative"),
}


@pytest.mark.parametrize("repro", sorted(IMATRIX_REPROS))
def test_bad_imatrix_ends_in_one_line_everywhere(repro: str, golden: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    make, message = IMATRIX_REPROS[repro]
    bad = make(golden, tmp_path)
    out = tmp_path / "out.gguf"
    for argv in (["--in-file", bad, "--show-statistics"], ["compare", bad, golden / C512],
                 ["report", bad, "-o", tmp_path / "report.html"], ["--in-file", bad, "-o", out],
                 ["quantize", "--imatrix", bad, TINY_MODEL, out, "Q4_K_M", "1"]):
        ends_in_one_line(capsys, argv, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([bad.name])  # nothing written


def test_names_from_a_file_are_printed_escaped_and_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clear_screen = b"\x1b[2J\x1b[H" * 300  # a .dat name of 2 KB that clears the terminal when printed raw
    bad = legacy_dat(tmp_path / "esc.dat", [(clear_screen, 1, np.ones(4)), (clear_screen, 1, np.ones(4))])
    line = ends_in_one_line(capsys, ["--in-file", bad, "--show-statistics"], r"esc\.dat: entry '\\x1b\[2J.*' appears")
    assert "\x1b" not in line and len(line) < 200


# the file's layout: what every reader refuses (collection, perplexity, quantization)
LAYOUT_REPROS = {
    "vocabulary string length": (set_vocabulary_string_length(2**62),
                                 r"a string of \d+ bytes in metadata 'tokenizer\.ggml\.tokens' runs past the end"),
    "dimensions halved": (set_dimension("blk.0.attn_q.weight", 1, 0.5),
                          r"tensor 'blk\.0\.attn_q\.weight' ends \d+ bytes before the next one starts"),
    "dimensions doubled": (set_dimension("blk.0.attn_q.weight", 1, 2),
                           r"tensors 'blk\.0\.attn_q\.weight' and '[^']+' overlap"),
    "last tensor's dimensions halved": (set_dimension("output_norm.weight", 0, 0.5),
                                        r"tensor 'output_norm\.weight' ends \d+ bytes before the end of the file"),
    "offset of another tensor": (set_offset("blk.1.attn_v.weight", like="blk.1.attn_q.weight"),
                                 r"overlap|dimensions do not match"),
    "misaligned offset": (set_offset("blk.0.attn_k.weight", plus=4), r"not a multiple of the alignment 32"),
}
# hyperparameters: what building the model refuses (quantization, like llama-quantize, does not build one);
# found by the fuzz suite at 10x its CI examples, and by setting each hyperparameter to extremes
HYPERPARAMETER_REPROS = {
    "odd head size": (set_metadata("llama.attention.key_length", 17),
                      r"hyperparameters do not make a llama model: .*even rotary dimension"),
    "no blocks": (set_metadata("llama.block_count", 0),
                  r"tensor 'blk\.0\.[a-z_.]+' lies beyond the 0 blocks that llama\.block_count states"),
    "a million blocks": (set_metadata("llama.block_count", 2**20), r"block_count is 1048576, more blocks than"),
    "huge head size": (set_metadata("llama.attention.key_length", 2**31),
                       r"key_length is 2147483648, larger than any tensor dimension"),
    "rope base NaN": (set_metadata("llama.rope.freq_base", float("nan"), "<f"), r"llama\.rope\.freq_base is nan$"),
}


@pytest.mark.parametrize("repro", sorted(LAYOUT_REPROS) + sorted(HYPERPARAMETER_REPROS))
def test_bad_model_ends_in_one_line(repro: str, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit, message = LAYOUT_REPROS.get(repro) or HYPERPARAMETER_REPROS[repro]
    bad = edited(TINY_MODEL, tmp_path / "bad.gguf", edit)
    out = tmp_path / "out.gguf"
    collect = ["-m", bad, "-f", text, "-o", out, "-c", "64", "--chunks", "2"]
    ends_in_one_line(capsys, collect, rf"bad\.gguf: .*{message}")
    if repro in LAYOUT_REPROS:
        ends_in_one_line(capsys, ["quantize", bad, out, "Q8_0", "1"], rf"bad\.gguf: .*{message}")
    assert not out.exists()


def test_huge_thread_counts_and_bytes_not_utf8_are_warnings(text: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`-t 100000` could not start its threads and then crashed; `quantize ... Q4_0 100000` hung; text that is
    not UTF-8 was decoded without a word."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(text.read_bytes() + "caf\u00e9".encode("latin-1"))
    argv = ["-m", TINY_MODEL, "-f", latin1, "-o", tmp_path / "o.gguf", "-c", "64", "--chunks", "2", "-t", "100000",
            "--chunks-in-flight", "100000", "-lv", "0"]
    assert main([str(arg) for arg in argv]) == 0
    err = capsys.readouterr().err
    assert re.search(r"imatrix: warning: 100000 threads requested, using \d+", err)
    assert re.search(r"imatrix: warning: 100000 chunks in flight requested, using \d+", err)
    assert re.search(r"imatrix: warning: \S*latin1\.txt: 1 byte\(s\) are not UTF-8 \(the first at byte \d+\)", err)
    assert main(["quantize", str(TINY_MODEL), str(tmp_path / "q.gguf"), "Q4_0", "100000"]) == 0
    assert re.search(r"warning: 100000 worker processes requested, using \d+", capsys.readouterr().err)


# --- calibration text that is not UTF-8 ---

# `llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf -f bad.txt --ids` (llama.cpp b6xxx as vendored)
NOT_UTF8 = b"Hello w\xe2\x82orld \xff\xfe caf\xc3\xa9 \xf0\x9f\x98 end \xc3"
LLAMA_CPP_IDS = [19556, 267, 24211, 24211, 1886, 216, 24211, 24211, 37366, 216, 24211, 24211, 24211, 1112, 216, 24211]


def test_text_that_is_not_utf8_is_read_as_llama_cpp_reads_it(smollm2_q4_1: Path, tmp_path: Path) -> None:
    from imatrix.models.tokenizer import tokenizer_from_gguf

    path = tmp_path / "bad.txt"
    path.write_bytes(NOT_UTF8)
    with pytest.warns(ImatrixWarning, match=r"bad\.txt: 8 byte\(s\) are not UTF-8 \(the first at byte 7\)"):
        text = read_calibration_text(path)
    assert text.count("\ufffd") == 8  # one per byte, as llama.cpp's unicode_cpts_from_utf8; Python's "replace": 5
    assert tokenizer_from_gguf(GGUFModelFile(smollm2_q4_1)).encode(text) == LLAMA_CPP_IDS
    path.write_bytes("caf\u00e9 \ufffd\n".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_calibration_text(path) == "caf\u00e9 \ufffd"  # valid UTF-8: no warning


# --- interruptions ---

HOOKED_RUN = """
import os, sys, time
from pathlib import Path

marker, output = Path(os.environ["PAUSE_MARKER"]), os.environ["PAUSE_OUTPUT"]
pause_at_save, pause_in_span = int(os.environ.get("PAUSE_AT_SAVE", 0)), os.environ.get("PAUSE_IN_SPAN")


def pause() -> None:
    (marker / str(os.getpid())).touch()
    time.sleep(600)


real_replace, saves = os.replace, []


def replace(source, target):  # the rename that ends a save: its temporary file is complete
    if str(target).endswith(output):
        saves.append(target)
        if len(saves) == pause_at_save:
            pause()
    real_replace(source, target)


os.replace = replace
if pause_in_span:
    import imatrix.quant.model as model

    def convert_span(*args):  # runs in the forked workers
        pause()

    model.convert_span = convert_span
from imatrix.cli.main import main

sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def hooked_run(argv: list[object], output: Path, marker: Path, **pause: str) -> Iterator[subprocess.Popen[str]]:
    """The command in a subprocess that pauses as `pause` says (PAUSE_AT_SAVE=n: in its n-th save of `output`;
    PAUSE_IN_SPAN=1: in every quantize worker's first span); yields it once paused (marker/<pid> files)."""
    marker.mkdir()
    env = {**os.environ, "PAUSE_MARKER": str(marker), "PAUSE_OUTPUT": output.name, **pause}
    process = subprocess.Popen([sys.executable, "-c", HOOKED_RUN, *map(str, argv)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + SECONDS_TO_PAUSE
        while not any(marker.iterdir()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached its pause"
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def paused_pids(marker: Path) -> list[int]:
    return [int(path.name) for path in marker.iterdir()]


def gone(pid: int, seconds: float = 10) -> bool:
    """The process ended within `seconds` (a zombie that no init reaps counts as ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def hidden_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# float32, as the in-process runs compared with it (tests/conftest.py)
COLLECT = ["-c", "32", "-b", "32", "--chunks", "6", "-ofreq", "2", "--chunks-in-flight", "1", "-lv", "0",
           "--dtype", "float32"]


def test_kill_9_then_resume_gives_the_uninterrupted_result(tiny_gguf: Path, text: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from test_resume import assert_same_file

    reference, out = tmp_path / "reference.gguf", tmp_path / "run" / "out.gguf"
    out.parent.mkdir()
    common = ["-m", tiny_gguf, "-f", text, *COLLECT]
    assert main([str(arg) for arg in [*common, "-o", reference]]) == 0
    with hooked_run([*common, "-o", out], out, tmp_path / "marker", PAUSE_AT_SAVE="2") as run:
        run.kill()  # in its second save: the first is in place, the second's temporary file written
        assert run.wait() == -signal.SIGKILL
    assert load_imatrix(out).chunk_count == 2
    assert [name for name in hidden_files(out.parent) if name.endswith(".tmp")]
    capsys.readouterr()
    assert main([str(arg) for arg in [*common, "-o", out, "--resume"]]) == 0
    assert "removed 1 temporary file(s) left by an interrupted run" in capsys.readouterr().err
    assert hidden_files(out.parent) == []  # the temporary file and the lock are gone
    assert_same_file(out, reference)


def test_sigterm_cleans_up_like_an_error(tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "out.gguf"
    out.parent.mkdir()
    with hooked_run(["-m", tiny_gguf, "-f", text, *COLLECT, "-o", out], out, tmp_path / "marker",
                    PAUSE_AT_SAVE="2") as run:
        run.terminate()
        _, err = run.communicate()
    assert run.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1] == "imatrix: terminated", err
    assert "Traceback" not in err
    assert hidden_files(out.parent) == []
    assert load_imatrix(out).chunk_count == 2


QUANTIZE = ["quantize", TINY_MODEL]


def test_quantize_interrupted_by_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "run" / "q.gguf"
    out.parent.mkdir()
    with hooked_run([*QUANTIZE, out, "Q8_0", "2"], out, tmp_path / "marker", PAUSE_IN_SPAN="1") as run:
        workers = paused_pids(tmp_path / "marker")
        run.terminate()
        _, err = run.communicate()
    assert run.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1] == "imatrix: terminated", err
    assert "Traceback" not in err
    assert all(gone(pid) for pid in workers)
    assert hidden_files(out.parent) == [] and not out.exists()


def test_a_killed_quantize_worker_is_an_error_not_a_hang(tmp_path: Path) -> None:
    out = tmp_path / "run" / "q.gguf"
    out.parent.mkdir()
    with hooked_run([*QUANTIZE, out, "Q8_0", "2"], out, tmp_path / "marker", PAUSE_IN_SPAN="1") as run:
        os.kill(paused_pids(tmp_path / "marker")[0], signal.SIGKILL)
        _, err = run.communicate(timeout=60)
    assert run.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("imatrix: error: a worker process ended unexpectedly (signal "
                                                   "SIGKILL)")
    assert hidden_files(out.parent) == [] and not out.exists()


def test_quantize_killed_with_9_leaves_no_worker_and_no_traceback(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run" / "q.gguf"
    out.parent.mkdir()
    with hooked_run([*QUANTIZE, out, "Q8_0", "2"], out, tmp_path / "marker", PAUSE_IN_SPAN="1") as run:
        workers = paused_pids(tmp_path / "marker")
        run.kill()
        _, err = run.communicate()
    assert all(gone(pid) for pid in workers)  # they die with their parent (PR_SET_PDEATHSIG)
    assert "Traceback" not in err, err
    assert hidden_files(out.parent)  # its temporary file and lock file stay behind
    assert main([*map(str, QUANTIZE), str(out), "Q8_0", "1"]) == 0  # and the next run sweeps them
    assert "left by an interrupted run" in capsys.readouterr().err
    assert hidden_files(out.parent) == []


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path: Path) -> None:
    """`imatrix quantize … | head -1`: a BrokenPipeError on stdout was a traceback, or blamed on the output."""
    run = subprocess.Popen([sys.executable, "-m", "imatrix.cli.main", *map(str, QUANTIZE), tmp_path / "q.gguf",
                            "Q8_0", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run.stdout.close()  # the reader is gone before the first line
    err = run.stderr.read()
    assert run.wait() == 128 + signal.SIGPIPE and "Traceback" not in err and "error" not in err, err
    assert hidden_files(tmp_path) == []


# --- a full disk, and a second writer ---


def write_small_output(path: Path) -> bytes:
    matrix = ImportanceMatrix(chunk_size=512, chunk_count=1)
    matrix.accumulate(Q, np.ones((1, 8), dtype=np.float32), np.array([512]))
    save_imatrix(matrix, path)
    return path.read_bytes()


def assert_a_full_disk_keeps_the_previous_output(golden: Path, out: Path, capsys: pytest.CaptureFixture[str],
                                                 message: str) -> None:
    before = write_small_output(out)
    with pytest.raises(ImatrixError, match=rf"out\.gguf: cannot write: {message}"):
        save_imatrix(load_imatrix(golden / C512), out)
    ends_in_one_line(capsys, ["--in-file", golden / C512, "-o", out], rf"out\.gguf: cannot write: {message}")
    assert out.read_bytes() == before
    assert sorted(path.name for path in out.parent.iterdir()) == ["out.gguf"]


@contextlib.contextmanager
def file_size_limit(n_bytes: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_file_size_limit_keeps_the_previous_output(golden: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.gguf"
    with file_size_limit(256 * 1024):
        assert_a_full_disk_keeps_the_previous_output(golden, out, capsys, "File too large")


def test_a_full_disk_keeps_the_previous_output(golden: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                             check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert_a_full_disk_keeps_the_previous_output(golden, mount / "out.gguf", capsys, "No space left on device")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


HOLD_OUTPUT = """
import sys, time
from pathlib import Path
from imatrix.formats.atomic import claimed_output

with claimed_output(sys.argv[1]):
    Path(sys.argv[2]).touch()
    time.sleep(600)
"""


def test_a_second_writer_of_one_output_is_refused(golden: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, held = tmp_path / "out.gguf", tmp_path / "held"
    before = write_small_output(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUTPUT, str(out), str(held)])
    try:
        deadline = time.monotonic() + SECONDS_TO_PAUSE
        while not held.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        refused = rf"out\.gguf: another process \(pid {holder.pid}\) is writing it"
        with pytest.raises(ImatrixError, match=refused):
            save_imatrix(load_imatrix(golden / C512), out)
        ends_in_one_line(capsys, ["--in-file", golden / C512, "-o", out], refused)
        ends_in_one_line(capsys, ["quantize", TINY_MODEL, out, "Q8_0", "1"], refused)
        assert out.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    save_imatrix(load_imatrix(golden / C512), out)  # its lock died with it
    assert hidden_files(tmp_path) == []
