"""`--resume`: an interrupted run continued from its last saved file ends with the uninterrupted run's file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from imatrix import CollectOptions, ImatrixError, Reporter, collect
from imatrix.cli.main import main
from imatrix.collection.run import CollectResult
from imatrix.formats import load_imatrices, load_imatrix, save_imatrix
from imatrix.models.loader import LoadedModel, load_model

N_CTX = 32
N_CHUNKS = 10


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def model(tiny_gguf: Path) -> LoadedModel:
    return load_model(tiny_gguf)


def options(out: Path, **overrides: object) -> CollectOptions:
    settings = {"ctx_size": N_CTX, "batch_size": N_CTX, "chunks": N_CHUNKS, "output_file": out,
                "output_frequency": 2, "dataset_name": "calibration.txt", **overrides}
    return CollectOptions(**settings)


def interrupt_after(chunk: int):  # noqa: ANN201
    def stdout(line: str) -> None:
        if line.startswith(f"[{chunk}]"):
            raise Interrupted

    return stdout


def run(model: LoadedModel, text: Path, out: Path, stdout=None, messages=None,  # noqa: ANN001
        **overrides: object) -> CollectResult:
    return collect(options(out, model=model, file=text, **overrides), Reporter(output=stdout, messages=messages))


def assert_same_file(ours: Path, reference: Path) -> None:
    a, b = load_imatrix(ours), load_imatrix(reference)
    assert (a.names(), a.chunk_count, a.chunk_size, a.datasets) == (b.names(), b.chunk_count, b.chunk_size,
                                                                   b.datasets)
    for name in b:
        assert a[name].counts.tolist() == b[name].counts.tolist(), name
        np.testing.assert_allclose(a[name].sums, b[name].sums, rtol=1e-5, err_msg=name)


def test_resume_after_interruption(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.gguf"
    run(model, text, reference)
    out = tmp_path / "resumed.gguf"
    with pytest.raises(Interrupted):
        run(model, text, out, stdout=interrupt_after(5))
    # chunks 5 and 6 run side by side (two in flight) and are saved before their lines are printed
    assert load_imatrix(out).chunk_count == 6
    printed: list[str] = []
    result = run(model, text, out, stdout=printed.append, resume=True)
    assert result.n_chunks == N_CHUNKS - 6
    assert "".join(printed).startswith("[7]")  # chunk numbers continue
    assert_same_file(out, reference)
    assert load_imatrix(out).datasets == ["calibration.txt"]


def test_resume_with_from_chunk_and_in_file(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    earlier = tmp_path / "earlier.gguf"
    run(model, text, earlier, chunks=3, dataset_name="earlier.txt")
    base = [earlier]
    reference = tmp_path / "reference.gguf"
    run(model, text, reference, in_file=base, from_chunk=2, batch_size=2 * N_CTX, chunks=8)
    out = tmp_path / "resumed.gguf"
    with pytest.raises(Interrupted):
        run(model, text, out, in_file=base, from_chunk=2, batch_size=2 * N_CTX, chunks=8,
            stdout=interrupt_after(4))
    assert load_imatrix(out).chunk_count == 3 + 4
    run(model, text, out, in_file=base, from_chunk=2, batch_size=2 * N_CTX, chunks=8, resume=True)
    assert_same_file(out, reference)
    assert load_imatrix(out).datasets == ["earlier.txt", "calibration.txt"]


def test_resume_of_a_finished_run_changes_nothing(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "done.gguf"
    run(model, text, out)
    before = load_imatrix(out)
    result = run(model, text, out, resume=True)
    assert result.n_chunks == 0
    assert_same_file(out, out)
    assert load_imatrix(out).chunk_count == before.chunk_count


def test_resume_without_a_file_starts_afresh(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    reference, out = tmp_path / "reference.gguf", tmp_path / "fresh.gguf"
    run(model, text, reference, chunks=4)
    run(model, text, out, chunks=4, resume=True)
    assert_same_file(out, reference)


def test_resume_refuses_another_chunk_size(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "c32.gguf"
    run(model, text, out, chunks=4)
    with pytest.raises(ImatrixError, match="chunks of 32 tokens, not 64"):
        run(model, text, out, ctx_size=64, batch_size=64, resume=True)


def test_cli_resume(tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    common = ["-m", str(tiny_gguf), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX), "-lv", "0", "-ofreq", "2"]
    reference, out = tmp_path / "reference.gguf", tmp_path / "out.gguf"
    assert main([*common, "--chunks", "6", "-o", str(reference)]) == 0
    assert main([*common, "--chunks", "4", "-o", str(out)]) == 0  # as if stopped after 4 chunks
    assert main([*common, "--chunks", "6", "-o", str(out), "--resume", "--sequential"]) == 0
    assert_same_file(out, reference)


def test_resume_refuses_another_text(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "first.gguf"
    run(model, text, out, chunks=4)
    before = out.read_bytes()
    edited = tmp_path / "calibration.txt"  # the same name, another content
    edited.write_bytes(text.read_bytes().replace(b" the ", b" a ", 1))
    with pytest.raises(ImatrixError, match=r"first\.gguf: cannot resume: it was collected with another text "
                                           r"\(SHA-256 [0-9a-f]{12}…, not [0-9a-f]{12}…\)"):
        run(model, edited, out, resume=True)
    assert out.read_bytes() == before


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from tiny_models import write_tiny_llama_gguf

    return load_model(write_tiny_llama_gguf(tmp_path_factory.mktemp("other") / "tiny.gguf", seed=1,
                                            dtype=np.float16))


@pytest.mark.parametrize(("first", "then", "message"), [
    ({"from_chunk": 1}, {}, "--chunk 1, not 0"),
    ({}, {"from_chunk": 1}, "--chunk 0, not 1"),
    ({}, {"parse_special": True}, "no --parse-special, this run with it"),
    ({"process_output": True}, {}, "--process-output, this run without it"),
    ({}, {"model": "other"}, "another model"),
])
def test_resume_refuses_another_run(model: LoadedModel, other_model: LoadedModel, text: Path, tmp_path: Path,
                                    first: dict, then: dict, message: str) -> None:
    """The issue's repro: --resume with another --chunk mixed two runs (cosine 0.894 against either)."""
    out = tmp_path / "first.gguf"
    run(model, text, out, chunks=2, **first)
    before = out.read_bytes()
    resumed_model = other_model if then.pop("model", None) else model
    with pytest.raises(ImatrixError, match=rf"first\.gguf: cannot resume: it was collected with {message}$"):
        run(resumed_model, text, out, chunks=4, resume=True, **then)
    assert out.read_bytes() == before


def test_resume_accepts_the_same_text_under_another_path(model: LoadedModel, text: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(text.parent)
    reference, out = tmp_path / "reference.gguf", tmp_path / "out.gguf"
    run(model, text, reference, chunks=6, dataset_name=None)
    run(model, Path(text.name), out, chunks=3, dataset_name=None)  # relative
    copy = tmp_path / "copy.txt"
    copy.write_bytes(text.read_bytes())
    result = run(model, copy, out, chunks=6, dataset_name=None, resume=True)
    assert result.n_chunks == 3
    saved = load_imatrix(out)
    assert saved.datasets == [text.name]  # the run's first name is kept
    saved.datasets = [str(text)]
    save_imatrix(saved, out)
    assert_same_file(out, reference)


def test_resume_of_a_dat_checks_the_text_name_with_a_warning(model: LoadedModel, text: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "first.dat"
    run(model, text, out, chunks=2, output_format="dat")
    warned: list[str] = []
    with pytest.raises(ImatrixError, match="collected on 'calibration.txt', not 'other.txt'"):
        run(model, text, out, chunks=4, resume=True, output_format="dat", dataset_name="other.txt",
            messages=warned.append)
    warnings = [line for line in warned if line.startswith("imatrix: warning: ")]
    assert len(warnings) == 1 and re.search(r"first\.dat: holds no record of the run that wrote it", warnings[0])
    warned.clear()
    result = run(model, text, out, chunks=4, resume=True, output_format="dat", messages=warned.append)
    warnings = [line for line in warned if line.startswith("imatrix: warning: ")]
    assert len(warnings) == 1 and "can check only the text's name" in warnings[0]
    assert result.n_chunks == 2


def test_the_run_record_does_not_disturb_llama_cpp(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    """imatrix.resume.* keys are our own; llama-imatrix and llama-quantize skip them (checked by hand with
    llama.cpp's binaries), and gguf-py reads them as plain metadata."""
    import gguf

    out = tmp_path / "out.gguf"
    run(model, text, out, chunks=2, from_chunk=1)
    fields = gguf.GGUFReader(out).fields
    assert fields["imatrix.resume.from_chunk"].contents() == 1
    assert len(fields["imatrix.resume.text_sha256"].contents()) == 64
    assert load_imatrices([out]).run_keys == {}  # merged files hold no single run
