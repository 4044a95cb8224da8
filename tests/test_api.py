"""The public API: docs/examples/api.py runs, each function is the CLI's, and the library prints nothing."""

from __future__ import annotations

import ast
import re
import runpy
import warnings
from pathlib import Path

import pytest

import imatrix
from imatrix import CollectOptions, ConvertOptions, MergeOptions, PerplexityOptions, Reporter
from imatrix.cli.collect import build_parser as collect_parser
from imatrix.cli.common import options_from
from imatrix.cli.main import main
from imatrix.cli.perplexity import build_parser as perplexity_parser
from imatrix.errors import ImatrixWarning
from imatrix.formats import load_imatrix
from imatrix.reporter import INFO, OUTPUT, WARN

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "api.py"
TINY = REPO / "tests" / "architectures" / "llama" / "model.gguf"


def test_the_example_runs(text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLE))["main"](TINY, text, tmp_path)
    out = capsys.readouterr().out
    assert re.search(r"^\[1\][0-9.]+,\[2\][0-9.]+,", out, re.M)  # the console reporter's results
    assert "merged: 8 chunks of 128 tokens" in out and "mean KLD" in out
    assert load_imatrix(tmp_path / "from-dat.gguf").names() == load_imatrix(tmp_path / "merged.gguf").names()
    assert (tmp_path / "q4_k_m.gguf").is_file() and (tmp_path / "base.kld").is_file()


def test_every_option_is_a_flag_of_its_command() -> None:
    """The CLI hands its parsed arguments over as they are: each option field is a flag's `dest`."""
    collect_flags = vars(collect_parser().parse_args([]))
    perplexity_flags = vars(perplexity_parser().parse_args([]))
    not_flags = {"dataset_name", "dtype"}  # dtype: `imatrix perplexity` computes in float32 (no --dtype)
    for options_class, flags in ((CollectOptions, collect_flags), (MergeOptions, collect_flags),
                                 (ConvertOptions, collect_flags), (PerplexityOptions, perplexity_flags)):
        fields = set(options_class.__dataclass_fields__) - not_flags
        assert fields <= set(flags), (options_class.__name__, fields - set(flags))
    assert "dtype" in collect_flags
    options = options_from(CollectOptions, collect_parser().parse_args(["-c", "256", "--chunks", "3", "--no-ppl"]))
    assert (options.ctx_size, options.chunks, options.ppl, options.output_file) == (256, 3, False, "imatrix.gguf")


def test_merge_and_convert_are_the_clis(golden: Path, tmp_path: Path) -> None:
    c512 = golden / "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
    c256 = golden / "imatrix/smollm2-f16.c256.chunk100.n20.imatrix.gguf"
    merged = imatrix.merge(MergeOptions(in_file=[c512, c256], output_file=tmp_path / "api.gguf"))
    assert main(["--in-file", str(c512), "--in-file", str(c256), "-o", str(tmp_path / "cli.gguf"), "-lv", "0"]) == 0
    assert (tmp_path / "api.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()
    assert merged.chunk_count == load_imatrix(tmp_path / "cli.gguf").chunk_count
    imatrix.convert(ConvertOptions(in_file=c512, output_file=tmp_path / "api.dat", output_format="dat"))
    assert main(["--in-file", str(c512), "--output-format", "dat", "-o", str(tmp_path / "cli.dat"), "-lv", "0"]) == 0
    assert (tmp_path / "api.dat").read_bytes() == (tmp_path / "cli.dat").read_bytes()


def test_the_reporter_filters_by_llama_cpps_levels() -> None:
    lines: list[str] = []
    for verbosity in (0, 2, 3):
        reporter = Reporter(verbosity, messages=lines.append)
        reporter.info(f"info {verbosity}")
        reporter.log(f"warn {verbosity}", WARN)
        reporter.warning(f"ours {verbosity}")
        reporter.log(f"always {verbosity}", OUTPUT)
    assert lines == ["imatrix: warning: ours 0", "always 0",
                     "warn 2", "imatrix: warning: ours 2", "always 2",
                     "info 3", "warn 3", "imatrix: warning: ours 3", "always 3"]
    assert INFO == 3


def test_warnings_go_to_the_reporter() -> None:
    lines: list[str] = []
    with Reporter(messages=lines.append).warnings_reported():
        warnings.warn("ours", ImatrixWarning, stacklevel=1)
    assert lines == ["imatrix: warning: ours"]


def test_a_silent_reporter_prints_nothing(tiny_gguf: Path, text: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    imatrix.collect(CollectOptions(model=tiny_gguf, file=text, ctx_size=64, chunks=2, output_file=tmp_path / "o.x"))
    assert capsys.readouterr() == ("", "")


def test_no_library_module_prints() -> None:
    """Output goes through a `Reporter`: `print` is for the CLI alone (imatrix.cli)."""
    package = REPO / "src" / "imatrix"
    printing = []
    for path in package.rglob("*.py"):
        if path.is_relative_to(package / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.relative_to(package)}:{node.lineno}")
    assert printing == []
