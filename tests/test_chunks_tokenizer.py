"""Chunking exactly as llama-imatrix cuts the token stream, and the GGUF-vocab tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imatrix import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.tokenizer import tokenizer_from_gguf
from imatrix.pipeline.chunks import make_chunks, read_calibration_text


def test_chunks_are_consecutive_windows() -> None:
    chunks = make_chunks(np.arange(1000), n_ctx=100)
    assert chunks.shape == (10, 100)
    np.testing.assert_array_equal(chunks.ravel(), np.arange(1000))


def test_from_chunk_drops_whole_chunks_and_chunks_caps() -> None:
    chunks = make_chunks(np.arange(1050), n_ctx=100, from_chunk=3, max_chunks=4)
    assert chunks.shape == (4, 100) and chunks[0, 0] == 300 and chunks[-1, -1] == 699


def test_bos_replaces_the_first_token_of_every_chunk() -> None:
    chunks = make_chunks(np.arange(10, 410), n_ctx=100, bos_id=1)
    assert chunks[:, 0].tolist() == [1, 1, 1, 1] and chunks[1, 1] == 111


def test_too_few_tokens_says_how_many() -> None:
    with pytest.raises(ImatrixError, match=r"calib\.txt: tokenizes to only 150 tokens; at least 200"):
        make_chunks(np.arange(150), n_ctx=100, source="calib.txt")


def test_from_chunk_beyond_the_text() -> None:
    with pytest.raises(ImatrixError, match="after skipping 5 chunks"):
        make_chunks(np.arange(600), n_ctx=100, from_chunk=5)


def test_one_trailing_newline_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"a\n\n")
    assert read_calibration_text(tmp_path / "t.txt") == "a\n"


def test_missing_text_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match="nope.txt: no such calibration text"):
        read_calibration_text(tmp_path / "nope.txt")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_q4_1: Path):  # noqa: ANN201
    return tokenizer_from_gguf(GGUFModelFile(smollm2_q4_1))


def test_smollm2_tokenizer_basics(smollm2_tokenizer) -> None:  # noqa: ANN001
    assert not smollm2_tokenizer.add_bos and smollm2_tokenizer.bos_id == 1
    ids = smollm2_tokenizer.encode("Hello world 2024!")
    assert smollm2_tokenizer.tokenizer.decode(ids) == "Hello world 2024!"
    # smollm pre-tokenizer: every digit is its own token
    assert [smollm2_tokenizer.tokenizer.id_to_token(i) for i in ids][-5:] == ["2", "0", "2", "4", "!"]


def test_special_tokens_only_parsed_on_request(smollm2_tokenizer) -> None:  # noqa: ANN001
    assert smollm2_tokenizer.encode("<|im_start|>user", parse_special=True)[0] == 1
    plain = smollm2_tokenizer.encode("<|im_start|>user", parse_special=False)
    assert 1 not in plain and len(plain) > 3
