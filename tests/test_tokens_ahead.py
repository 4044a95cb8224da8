"""The text tokenized in a forked child while the model loads (`pipeline.tokens_ahead`): the same tokens as
tokenizing here, or none at all (and then the tokenizer here does the work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imatrix import api
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.tokenizer import tokenizer_from_gguf
from imatrix.options import CollectOptions
from imatrix.pipeline import tokens_ahead
from imatrix.pipeline.chunks import read_calibration_text
from imatrix.pipeline.tokens_ahead import TokensAhead, with_tokens_ahead

SPECIAL_TEXT = "Plain words, then <|im_start|>assistant and <|endoftext|> inside.\n" * 40


class CountingTokenizer:
    """Wraps a tokenizer and counts its `encode` calls."""

    def __init__(self, tokenizer: object) -> None:
        self.wrapped, self.calls = tokenizer, 0
        self.bos_id, self.add_bos = tokenizer.bos_id, tokenizer.add_bos

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        self.calls += 1
        return self.wrapped.encode(text, parse_special=parse_special)


@pytest.fixture(scope="module")
def special_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ahead") / "special.txt"
    path.write_text(SPECIAL_TEXT)
    return path


@pytest.mark.parametrize("parse_special", [False, True])
def test_the_childs_tokens_are_the_tokens_of_this_process(smollm2_q4_1: Path, special_text: Path,
                                                          parse_special: bool) -> None:
    here = CountingTokenizer(tokenizer_from_gguf(GGUFModelFile(smollm2_q4_1)))
    text = read_calibration_text(special_text)
    expected = here.encode(text, parse_special=parse_special)
    with TokensAhead.start(smollm2_q4_1, special_text, parse_special) as ahead:
        tokenizer = with_tokens_ahead(here, ahead)
        tokens = tokenizer.encode(text, parse_special=parse_special)
    assert tokens == expected
    assert here.calls == 1 and tokenizer.seconds > 0  # the child's tokens were taken, not tokenized again
    assert not ahead.process.is_alive() and ahead.process.exitcode == 0


def test_another_text_or_parse_special_is_tokenized_here(smollm2_q4_1: Path, special_text: Path) -> None:
    here = CountingTokenizer(tokenizer_from_gguf(GGUFModelFile(smollm2_q4_1)))
    with TokensAhead.start(smollm2_q4_1, special_text, parse_special=False) as ahead:
        tokenizer = with_tokens_ahead(here, ahead)
        changed = read_calibration_text(special_text) + " one more word"
        assert tokenizer.encode(changed) == here.wrapped.encode(changed)
        text = read_calibration_text(special_text)
        assert tokenizer.encode(text, parse_special=True) == here.wrapped.encode(text, parse_special=True)
    assert here.calls == 2 and tokenizer.seconds is None


def test_a_child_that_fails_leaves_the_tokenizing_here(tmp_path: Path, smollm2_q4_1: Path,
                                                       special_text: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(model_file: object) -> None:
        raise RuntimeError("no vocabulary")

    monkeypatch.setattr(tokens_ahead, "tokenizer_from_gguf", failing)  # the forked child inherits it
    here = CountingTokenizer(tokenizer_from_gguf(GGUFModelFile(smollm2_q4_1)))
    with TokensAhead.start(smollm2_q4_1, special_text, parse_special=False) as ahead:
        text = read_calibration_text(special_text)
        assert with_tokens_ahead(here, ahead).encode(text) == here.wrapped.encode(text)
    assert here.calls == 1


def test_nothing_is_forked_for_a_model_that_is_no_gguf_file(tmp_path: Path, special_text: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert TokensAhead.start(tmp_path, special_text, False) is None  # a Hugging Face directory
    assert TokensAhead.start(tmp_path / "missing.gguf", special_text, False) is None
    assert TokensAhead.start(special_text, special_text, False) is None  # not GGUF
    assert TokensAhead.start(tmp_path / "config.json", None, False) is None


def test_a_collection_with_and_without_the_child_is_the_same(smollm2_q4_1: Path, text: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    options = CollectOptions(model=smollm2_q4_1, file=text, ctx_size=128, chunks=3, ppl=True)
    started = []
    start = TokensAhead.start

    def recorded(*args: object) -> TokensAhead | None:
        started.append(start(*args))
        return started[-1]

    monkeypatch.setattr(TokensAhead, "start", recorded)
    ahead = api.collect(options)
    monkeypatch.setattr(TokensAhead, "start", lambda *args: None)
    here = api.collect(options)
    assert started and started[0] is not None and not started[0].process.is_alive()
    assert ahead.ppl.ppl == here.ppl.ppl
    for name in here.matrix:
        np.testing.assert_array_equal(ahead.matrix[name].sums, here.matrix[name].sums)


def test_the_command_line_imports_no_torch_before_the_child_forks() -> None:
    """The child overlaps the imports only if it is forked before them."""
    modules = ("imatrix.cli.main, imatrix.cli.collect, imatrix.cli.perplexity, imatrix.api, "
               "imatrix.pipeline.tokens_ahead")
    check = f"import sys, {modules}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_leaving_before_the_result_stops_the_child(smollm2_q4_1: Path, calibration_text: Path) -> None:
    """An error before the text is tokenized (a refused output path, Ctrl-C) must not wait for the child."""
    ahead = TokensAhead.start(smollm2_q4_1, calibration_text, False)
    with ahead:
        pass
    assert not ahead.process.is_alive()
