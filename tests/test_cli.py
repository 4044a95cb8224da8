"""The `imatrix` command: llama-imatrix's flags, merges/conversions, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imatrix.cli.main import main
from imatrix.errors import ImatrixError
from imatrix.formats import load_imatrix, save_imatrix

C512 = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
C512_DAT = "imatrix/smollm2-f16.c512.n40.imatrix.dat"
C256 = "imatrix/smollm2-f16.c256.chunk100.n20.imatrix.gguf"


def fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imatrix: error: "), err
    for fragment in expected:
        assert fragment in err[0]
    return err[0]


def test_merge_two_files_like_llama_cpp(golden: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    assert main(["--in-file", str(golden / C512), "--in-file", str(golden / C256), "-o", str(out), "-lv", "0"]) == 0
    assert out.read_bytes() == (golden / "imatrix/merged.imatrix.gguf").read_bytes()


def test_comma_separated_in_files(golden: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    assert main(["--in-file", f"{golden / C512},{golden / C256}", "-o", str(out), "-lv", "0"]) == 0
    assert out.read_bytes() == (golden / "imatrix/merged.imatrix.gguf").read_bytes()


def test_conversions_both_ways(golden: Path, tmp_path: Path) -> None:
    to_dat, to_gguf = tmp_path / "x.dat", tmp_path / "x.gguf"
    assert main(["--in-file", str(golden / C512), "--output-format", "dat", "-o", str(to_dat), "-lv", "0"]) == 0
    assert main(["--in-file", str(golden / C512_DAT), "-o", str(to_gguf), "-lv", "0"]) == 0
    assert to_dat.read_bytes() == (golden / "imatrix/from-gguf.imatrix.dat").read_bytes()
    assert to_gguf.read_bytes() == (golden / "imatrix/from-dat.imatrix.gguf").read_bytes()


def test_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    fails_cleanly(capsys, ["--no-such-flag"], "unrecognized arguments: --no-such-flag")


def test_missing_model(capsys: pytest.CaptureFixture[str], calibration_text: Path, tmp_path: Path) -> None:
    fails_cleanly(capsys, ["-m", str(tmp_path / "absent.gguf"), "-f", str(calibration_text), "-o",
                           str(tmp_path / "o.gguf")], "absent.gguf", "no such model")


def test_model_that_is_not_gguf(capsys: pytest.CaptureFixture[str], calibration_text: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    fails_cleanly(capsys, ["-m", str(fake), "-f", str(calibration_text), "-o", str(tmp_path / "o.gguf")],
                  "model.gguf", "not a GGUF file")


def test_missing_text(capsys: pytest.CaptureFixture[str], smollm2_q4_1: Path, tmp_path: Path) -> None:
    fails_cleanly(capsys, ["-m", str(smollm2_q4_1), "-f", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o.gguf")],
                  "none.txt", "no such calibration text")


def test_missing_output_directory(capsys: pytest.CaptureFixture[str], golden: Path, tmp_path: Path) -> None:
    fails_cleanly(capsys, ["--in-file", str(golden / C512), "-o", str(tmp_path / "no" / "dir.gguf")],
                  "does not exist")


def test_corrupt_in_file_keeps_previous_output(capsys: pytest.CaptureFixture[str], golden: Path,
                                               tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.dat"
    corrupt.write_bytes((golden / C512_DAT).read_bytes()[:1234])
    out = tmp_path / "out.gguf"
    out.write_bytes(b"earlier result")
    fails_cleanly(capsys, ["--in-file", str(corrupt), "-o", str(out)], "corrupt.dat", "truncated or corrupt")
    assert out.read_bytes() == b"earlier result"


def test_merging_disagreeing_shapes(capsys: pytest.CaptureFixture[str], golden: Path, tmp_path: Path) -> None:
    matrix = load_imatrix(golden / C256)
    stats = matrix.tensors["blk.3.ffn_down.weight"]
    stats.sums = stats.sums[:, :100]
    save_imatrix(matrix, tmp_path / "other.gguf")
    fails_cleanly(capsys, ["--in-file", str(golden / C512), "--in-file", str(tmp_path / "other.gguf"),
                           "-o", str(tmp_path / "o.gguf")], "blk.3.ffn_down.weight")


def test_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    fails_cleanly(capsys, ["-c", "0"], "--ctx-size")
    fails_cleanly(capsys, ["-c", "512", "-b", "0"], "--batch-size")


def test_batch_clamped_to_whole_chunks(capsys: pytest.CaptureFixture[str], tiny_gguf: Path, text: Path,
                                       tmp_path: Path) -> None:
    # llama-imatrix runs -b 2048 -c 1000 as n_seq = 2, batch_size = 2000 (its main clamps -b to n_seq·c)
    common = ["-m", str(tiny_gguf), "-f", str(text), "-c", "48", "--chunks", "3"]
    assert main([*common, "-b", "100", "-o", str(tmp_path / "b100.gguf")]) == 0
    assert "computing over 3 chunks, n_ctx=48, batch_size=96, n_seq=2" in capsys.readouterr().err
    assert main([*common, "-b", "48", "-o", str(tmp_path / "b48.gguf"), "-lv", "0"]) == 0
    clamped, single = load_imatrix(tmp_path / "b100.gguf"), load_imatrix(tmp_path / "b48.gguf")
    for name in single:
        assert clamped[name].sums.tobytes() == single[name].sums.tobytes(), name


def test_llama_imatrix_option_spellings(golden: Path, tmp_path: Path) -> None:
    """llama.cpp's other names for our flags: -o/--output, --ppl, --log-verbosity, -tb."""
    out = tmp_path / "o.dat"
    argv = ["--in-file", str(golden / C512), "--output-format", "dat", "--output", str(out), "--log-verbosity", "0",
            "--ppl", "-tb", "1"]
    assert main(argv) == 0
    assert out.read_bytes() == (golden / "imatrix/from-gguf.imatrix.dat").read_bytes()


def test_suffix_warning_only_when_the_format_is_not_given(capsys: pytest.CaptureFixture[str], golden: Path,
                                                          tmp_path: Path) -> None:
    argv = ["--in-file", str(golden / C512), "-o", str(tmp_path / "o.bin")]
    assert main(argv) == 0
    assert "without a .gguf suffix" in capsys.readouterr().err
    assert main([*argv, "--output-format", "gguf"]) == 0  # llama.cpp warns only when it chose the format
    assert "without a .gguf suffix" not in capsys.readouterr().err


def test_help_lists_llama_imatrix_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-h"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--model", "--file", "--output-file", "--ctx-size", "--batch-size", "--threads", "-ngl",
                 "--chunk", "--chunks", "--no-ppl", "--process-output", "-ofreq", "--save-frequency",
                 "--in-file", "--output-format", "--parse-special", "-lv"):
        assert flag in usage


@pytest.mark.slow
def test_cli_end_to_end_on_quantized_model(smollm2_q4_1: Path, calibration_text: Path, tmp_path: Path) -> None:
    """The console script on the bundled Q4_1 model: files, stdout lines, a clean stderr, exit 0, the text
    tokenized in the forked child."""
    out = tmp_path / "imatrix.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "imatrix.cli.main", "-m", str(smollm2_q4_1), "-f", str(calibration_text),
         "-o", str(out), "-c", "256", "--chunks", "8", "-t", "2", "--output-format", "dat"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "[8]" in done.stdout and "Final estimate: PPL = " in done.stdout
    assert "Traceback" not in done.stderr
    assert "in another process, while the model loaded" in done.stderr  # tokenized ahead (`pipeline.tokens_ahead`)
    matrix = load_imatrix(out, chunk_size=256)
    assert len(matrix) == 210 and matrix.chunk_count == 8 and matrix.datasets == [str(calibration_text)]


@pytest.mark.slow
def test_text_too_short_for_the_context(capsys: pytest.CaptureFixture[str], smollm2_q4_1: Path,
                                        tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    fails_cleanly(capsys, ["-m", str(smollm2_q4_1), "-f", str(short), "-o", str(tmp_path / "o.gguf"), "-lv", "0"],
                  "short.txt", "tokenizes to only", "at least 1024")


@pytest.mark.parametrize("output", ["", "."])
def test_output_that_cannot_be_a_file(capsys: pytest.CaptureFixture[str], golden: Path, output: str) -> None:
    fails_cleanly(capsys, ["--in-file", str(golden / C512), "-o", output], "output file")


def test_empty_in_file_list_is_not_a_collection(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails_cleanly(capsys, ["--in-file", "", "-o", str(tmp_path / "o.gguf")], "--in-file names no file")
    fails_cleanly(capsys, ["--in-file", ",", "-o", str(tmp_path / "o.gguf")], "--in-file names no file")


def test_in_file_that_is_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails_cleanly(capsys, ["--in-file", str(tmp_path), "-o", str(tmp_path / "o.gguf")], "is a directory")


def test_output_that_is_an_input(capsys: pytest.CaptureFixture[str], tiny_gguf: Path, text: Path,
                                 tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    fails_cleanly(capsys, ["-m", str(model), "-f", str(text), "-o", str(model)], str(model), "also the model")
    fails_cleanly(capsys, ["-m", str(model), "-f", str(text), "-o", str(text)], "also the calibration text")
    assert model.read_bytes() == tiny_gguf.read_bytes()


def test_zero_chunks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails_cleanly(capsys, ["--chunks", "0", "-o", str(tmp_path / "o.gguf")], "--chunks 0")


def test_llama_cpp_runtime_flags_are_accepted(golden: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.dat"
    argv = ["-fa", "-ctk", "q8_0", "-ctv", "q8_0", "-ub", "128", "-nkvo", "--no-mmap", "-np", "2", "-ot", "exps=CPU",
            "-cmoe", "-ncmoe", "3", "-sm", "layer", "-ts", "3,1", "-mg", "0",
            "--in-file", str(golden / C512), "--output-format", "dat", "-o", str(out), "-lv", "0"]
    assert main(argv) == 0  # unregistered, -fa would be read as -f a, -ctk as -c tk, -ot as -o t
    assert out.read_bytes() == (golden / "imatrix/from-gguf.imatrix.dat").read_bytes()
    assert main(["--flash-attn", "off", *argv[1:]]) == 0


def test_batch_smaller_than_the_context(tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    # llama-imatrix takes -b < -c (a chunk in several batches): the same statistics as one batch per chunk
    common = ["-m", str(tiny_gguf), "-f", str(text), "-c", "64", "--chunks", "3", "-lv", "0"]
    assert main([*common, "-b", "16", "-o", str(tmp_path / "b16.gguf")]) == 0
    assert main([*common, "-b", "64", "-o", str(tmp_path / "b64.gguf")]) == 0
    small, whole = load_imatrix(tmp_path / "b16.gguf"), load_imatrix(tmp_path / "b64.gguf")
    assert small.names() == whole.names() and small.chunk_count == whole.chunk_count == 3
    for name in whole:
        assert small[name].counts.tolist() == whole[name].counts.tolist()
        assert small[name].sums.tobytes() == whole[name].sums.tobytes(), name


def test_in_file_of_another_model_fails_before_collecting(capsys: pytest.CaptureFixture[str], golden: Path,
                                                          tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    message = fails_cleanly(capsys, ["-m", str(tiny_gguf), "-f", str(text), "-c", "64", "--in-file", str(golden / C512),
                                     "-o", str(tmp_path / "o.gguf"), "-lv", "0"],
                            "--in-file data does not fit the model",
                            "1 × 576 columns there, 1 × 64 columns in the model")
    assert "blk.0." in message and not (tmp_path / "o.gguf").exists()


def test_output_directory_fails_before_collecting(capsys: pytest.CaptureFixture[str], tiny_gguf: Path, text: Path,
                                                  tmp_path: Path) -> None:
    fails_cleanly(capsys, ["-m", str(tiny_gguf), "-f", str(text), "-c", "64", "-o", str(tmp_path), "-lv", "0"],
                  "is a directory")
    assert "[1]" not in capsys.readouterr().out


def test_gguf_without_hyperparameters(capsys: pytest.CaptureFixture[str], golden: Path, text: Path,
                                      tmp_path: Path) -> None:
    fails_cleanly(capsys, ["-m", str(golden / "quant" / "source-f16.gguf"), "-f", str(text), "-o",
                           str(tmp_path / "o.gguf"), "-lv", "0"], "source-f16.gguf", "metadata key", "is missing")


def test_gguf_with_a_broken_vocabulary(capsys: pytest.CaptureFixture[str], text: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tiny_models

    # a token listed twice: llama.cpp refuses the vocabulary (merges of unknown tokens it accepts, and so do we)
    monkeypatch.setattr(tiny_models, "BOS", "Ġt")
    model = tiny_models.write_tiny_llama_gguf(tmp_path / "broken.gguf")
    fails_cleanly(capsys, ["-m", str(model), "-f", str(text), "-o", str(tmp_path / "o.gguf"), "-lv", "0"],
                  "broken.gguf", "token 'Ġt' is in the vocabulary twice")


def test_a_context_too_short_to_score_still_saves(capsys: pytest.CaptureFixture[str], tiny_gguf: Path, text: Path,
                                                  tmp_path: Path) -> None:
    # -c 2 scores no position (n_ctx/2 … n_ctx-2 is empty): llama-imatrix prints nan and saves anyway
    out = tmp_path / "c2.gguf"
    assert main(["-m", str(tiny_gguf), "-f", str(text), "-c", "2", "--chunks", "3", "-lv", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1]nan," in printed and "Unexpected negative standard deviation of log(prob)" in printed
    assert load_imatrix(out).chunk_count == 3


def test_python_api_rejects_what_the_cli_rejects(tiny_gguf: Path, text: Path) -> None:
    from imatrix import CollectOptions, ImatrixError, collect

    for wrong in ({"ctx_size": 0}, {"ctx_size": -5}, {"chunks": 0}, {"chunks_in_flight": -1}):
        with pytest.raises(ImatrixError):
            collect(CollectOptions(model=tiny_gguf, file=text, **wrong))


def test_context_beyond_the_trained_one_is_a_warning(capsys: pytest.CaptureFixture[str], tiny_gguf: Path, text: Path,
                                                     tmp_path: Path) -> None:
    argv = ["-m", str(tiny_gguf), "-f", str(text), "-c", "600", "--chunks", "1", "--no-ppl",
            "-o", str(tmp_path / "o.gguf")]
    assert main(argv) == 0
    assert "warning: model was trained on only 512 context tokens (600 per chunk specified)" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["collect", "perplexity"])
def test_every_ignored_llama_cpp_flag_changes_nothing(module: str) -> None:
    import importlib

    from imatrix.cli.common import IGNORED_LLAMA_CPP_FLAGS

    parser = importlib.import_module(f"imatrix.cli.{module}").build_parser()
    ignored = {parser._option_string_actions[names[0]].dest for names, _ in IGNORED_LLAMA_CPP_FLAGS}
    ours = {key: value for key, value in vars(parser.parse_args([])).items() if key not in ignored}
    for names, values in IGNORED_LLAMA_CPP_FLAGS:
        for name in names:
            argv = [name] if values in (0, "?") else [name, "1"]
            parsed = vars(parser.parse_args(argv))
            assert {key: parsed[key] for key in ours} == ours, argv


def test_single_dash_flags_are_whole_names(capsys: pytest.CaptureFixture[str], golden: Path, tmp_path: Path) -> None:
    # as llama.cpp's parser: no `-c512`, no prefix (`-l` is not -lv), no value glued to a short flag
    fails_cleanly(capsys, ["-c512"], "unrecognized arguments: -c512")
    fails_cleanly(capsys, ["-l", "1"], "unrecognized arguments: -l 1")
    fails_cleanly(capsys, ["-bf", "text.bin"], "unrecognized arguments: -bf text.bin")
    out = tmp_path / "o.dat"
    argv = ["--in-file", str(golden / C512), "--output-format", "dat", "-o", str(out), "-lv", "0"]
    assert main(["-fit", "off", "-s", "7", "-dev", "none", "-ngl", "all", *argv]) == 0  # not -f it, -sm 7
    assert out.read_bytes() == (golden / "imatrix/from-gguf.imatrix.dat").read_bytes()


def test_llama_cpp_device_names() -> None:
    from imatrix.cli.collect import build_parser
    from imatrix.pipeline.executors import resolve_device

    parser = build_parser()
    assert [parser.parse_args(["-dev", name]).device for name in ("none", "CUDA1", "cuda:0", "Auto")] == [
        "cpu", "cuda:1", "cuda:0", "auto"]
    assert [parser.parse_args(["-ngl", text]).n_gpu_layers for text in ("99", "auto", "all")] == [99, -1, -2]
    with pytest.raises(ImatrixError, match="one device at a time"):
        parser.parse_args(["-dev", "CUDA0,CUDA1"])
    assert resolve_device("cuda", n_gpu_layers=0).type == "cpu"


@pytest.mark.parametrize(("flags", "progress", "warning"), [
    ([], True, True), (["-lv", "3"], True, True), (["-lv", "2"], False, True), (["-lv", "1"], False, False),
    (["-lv", "0", "-v"], True, True),
])
def test_verbosity_levels_as_llama_cpp(capsys: pytest.CaptureFixture[str], golden: Path, tmp_path: Path,
                                       flags: list[str], progress: bool, warning: bool) -> None:
    assert main(["--in-file", str(golden / C512), "-o", str(tmp_path / "o.bin"), *flags]) == 0
    err = capsys.readouterr().err
    assert ("combining 1 imatrix file(s)" in err) == progress
    assert ("without a .gguf suffix" in err) == warning


def test_perplexity_takes_llama_perplexity_spellings() -> None:
    from imatrix.cli.perplexity import build_parser

    args = build_parser().parse_args(["--save-all-logits", "base.kld", "-ngl", "99", "-tb", "4", "--no-warmup",
                                      "-kvu", "-lv", "2"])
    assert (args.kl_divergence_base, args.n_gpu_layers, args.threads_batch, args.verbosity) == ("base.kld", 99, 4, 2)
