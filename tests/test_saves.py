"""When llama-imatrix saves (-ofreq, --save-frequency), and what our saves then hold and print."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from imatrix import CollectOptions, Reporter, collect
from imatrix.collection.saves import llama_cpp_saves, save_points, snapshot_cuts
from imatrix.formats import load_imatrix
from imatrix.pipeline.distributed import Group
from imatrix.pipeline.windows import plan_windows


def counts(saves: list, kind: str) -> list[int]:
    return [save.chunk_count for save in saves if getattr(save, kind)]


def test_default_run_saves_every_ten_chunks_mid_batch() -> None:
    # -c 512 -b 2048: four chunks per batch, one 512-token micro-batch per chunk, so the count reaches
    # each multiple of 10 exactly, inside the batch that holds it
    saves = llama_cpp_saves(n_chunk=40, n_ctx=512, n_seq=4, n_batch=2048, base_tokens=0, output_frequency=10,
                            save_frequency=10)
    assert counts(saves, "output") == counts(saves, "snapshot") == [10, 20, 30, 40]
    assert [save.batch for save in saves] == [2, 4, 7, 9]
    assert [save.chunks_done for save in saves] == [10, 20, 30, 40]


def test_micro_batches_of_several_chunks_step_over_multiples() -> None:
    # -c 256: a 512-token micro-batch adds two chunks, the count goes 2, 4, 6, ...; llama.cpp saves at
    # the first count past a multiple: (count % 5) // 2 == 0 at 6, 10, 16, 20
    saves = llama_cpp_saves(n_chunk=20, n_ctx=256, n_seq=8, n_batch=2048, base_tokens=0, output_frequency=10,
                            save_frequency=5)
    assert counts(saves, "snapshot") == [6, 10, 16, 20]
    assert counts(saves, "output") == [10, 20]


def test_several_sequences_take_equal_shares_of_a_micro_batch() -> None:
    # what llama-imatrix (built from the vendored llama.cpp source) wrote: with one KV stream per
    # sequence, a micro-batch takes 512 // n_seqs tokens of each (504 for 12 sequences, 510 for 6), so
    # the count steps over multiples at other places than 512-token micro-batches would
    saves = llama_cpp_saves(n_chunk=28, n_ctx=128, n_seq=16, n_batch=2048, base_tokens=0, output_frequency=100,
                            save_frequency=5)
    assert counts(saves, "snapshot") == [8, 12, 16, 23, 27]
    saves = llama_cpp_saves(n_chunk=12, n_ctx=256, n_seq=6, n_batch=1536, base_tokens=0, output_frequency=100,
                            save_frequency=5)
    assert counts(saves, "snapshot") == [5, 11]


def test_counting_continues_from_in_file_data() -> None:
    # 3.5 chunks loaded: after two chunks of this run the count is 5 (2816 tokens / 512)
    saves = llama_cpp_saves(n_chunk=8, n_ctx=512, n_seq=4, n_batch=2048, base_tokens=1792, output_frequency=100,
                            save_frequency=5)
    assert [(save.chunk_count, save.chunks_done) for save in saves] == [(5, 2), (10, 7)]


def test_batch_below_the_context_counts_each_decode() -> None:
    # -c 512 -b 256: two decodes per chunk, the count moves every other micro-batch
    saves = llama_cpp_saves(n_chunk=6, n_ctx=512, n_seq=1, n_batch=256, base_tokens=0, output_frequency=2,
                            save_frequency=3)
    assert counts(saves, "output") == [2, 4, 6] and counts(saves, "snapshot") == [3, 6]
    assert [save.batch for save in saves] == [1, 2, 3, 5]


def test_snapshots_cut_batches_output_saves_do_not() -> None:
    saves = llama_cpp_saves(n_chunk=16, n_ctx=512, n_seq=4, n_batch=2048, base_tokens=0, output_frequency=6,
                            save_frequency=10)
    windows = plan_windows(n_chunk=16, n_seq=4, group=Group(), window_chunks=64, cuts=snapshot_cuts(saves),
                           ends=save_points(saves))
    assert [[batch for step in window for batch in step.batches] for window in windows] == [
        [(0, 4), (4, 4)],  # the output save at 6 waits for the end of its batch
        [(8, 2)],  # the snapshot at 10 holds exactly ten chunks
        [(10, 2)],  # the output save at 12 comes at the end of its (cut) batch
        [(12, 4)],
    ]


def run(model: Path, text: Path, out: Path, printed: list[str] | None = None, **options: object) -> None:
    settings = {"ctx_size": 32, "batch_size": 128, "dataset_name": "t.txt", "output_file": out, **options}
    printed = printed if printed is not None else []
    collect(CollectOptions(model=model, file=text, **settings), Reporter(output=printed.append))


def test_snapshots_hold_exactly_their_chunks(tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    # -c 128 -b 1024: eight chunks per batch, micro-batches of four: snapshots at 4 (inside the first
    # batch, which is cut there) and 8
    common = {"ctx_size": 128, "batch_size": 1024}
    run(tiny_gguf, text, tmp_path / "long.gguf", chunks=9, save_frequency=2, output_frequency=100, **common)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["long.gguf", "long.gguf.at_4", "long.gguf.at_8"]
    for n in (4, 8):
        run(tiny_gguf, text, tmp_path / f"only{n}.gguf", chunks=n, **common)
        snapshot = load_imatrix(tmp_path / f"long.gguf.at_{n}")
        alone = load_imatrix(tmp_path / f"only{n}.gguf")
        assert snapshot.chunk_count == alone.chunk_count == n
        for name in alone:
            assert snapshot[name].counts.tolist() == alone[name].counts.tolist()
            np.testing.assert_array_equal(snapshot[name].sums, alone[name].sums, err_msg=name)


def test_newlines_where_llama_cpp_prints_them(tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    # n_seq = 4, micro-batches of 128 tokens = 4 chunks: saves at 4 (batch 0) and 8 (batch 1); a save's
    # newline comes before the ppl lines of the batch it happens in, each save its own
    printed: list[str] = []
    run(tiny_gguf, text, tmp_path / "o.gguf", printed, chunks=10, output_frequency=4, save_frequency=8)
    lines = "".join(printed).split("\n")
    ppl_lines = [re.findall(r"\[(\d+)\]", line) for line in lines[:5]]
    assert ppl_lines == [[], ["1", "2", "3", "4"], [], ["5", "6", "7", "8", "9", "10"], []]
