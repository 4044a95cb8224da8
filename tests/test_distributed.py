"""torch.distributed: two gloo ranks under torchrun give the single-process file and perplexity."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imatrix import ImportanceMatrix
from imatrix.collect.distributed import Group
from imatrix.collect.runner import CollectOptions, collect, llama_cpp_saves, plan_windows
from imatrix.models.bundled import default_calibration_text
from tiny_models import write_tiny_llama_gguf

N_CTX = 32


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    text = tmp_path / "calibration.txt"
    text.write_bytes(default_calibration_text().read_bytes()[:6_000])
    # 9 chunks in batches of 2: rank 1 has nothing to do in the last step
    flags = ["-m", str(model), "-f", str(text), "-c", str(N_CTX), "-b", str(2 * N_CTX), "--chunks", "9",
             "--process-output", "-ofreq", "4", "--device", "cpu", "-lv", "3", "--dtype", "float32"]
    out = tmp_path / "two_ranks.gguf"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "imatrix.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *flags, "-o", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    printed: list[str] = []
    options = CollectOptions(n_ctx=N_CTX, n_batch=2 * N_CTX, max_chunks=9, process_output=True,
                             output_file=tmp_path / "one.gguf", output_frequency=4, progress=False,
                             verbosity=0, dataset_name=str(text))
    single = collect(model, text, options, stdout=printed.append)

    ours, reference = ImportanceMatrix.load(out), single.matrix
    assert (ours.names(), ours.chunk_count, ours.datasets) == (reference.names(), 9, reference.datasets)
    assert "output.weight" in ours
    for name in reference:
        assert ours[name].counts.tolist() == reference[name].counts.tolist(), name
        np.testing.assert_allclose(ours[name].sums, reference[name].sums, rtol=1e-5, err_msg=name)
    chunk_ppl = [float(value) for value in re.findall(r"\[\d+\]([0-9.]+),", done.stdout)]
    np.testing.assert_allclose(chunk_ppl, single.chunk_ppl, rtol=1e-4)
    final = re.findall(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done.stdout)
    assert len(final) == 1  # rank 0 alone prints
    np.testing.assert_allclose([float(v) for v in final[0]], single.ppl.final(), rtol=1e-4)
    assert done.stderr.count("save_imatrix: stored collected data after 9 chunks") == 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_windows_cover_every_batch_once(world: int) -> None:
    saves = llama_cpp_saves(n_chunk=11, n_ctx=N_CTX, n_seq=2, n_batch=2 * N_CTX, base_tokens=0,
                            output_frequency=4, save_frequency=0)
    windows = plan_windows(n_chunk=11, n_seq=2, group=Group(0, world), saves=saves, window_chunks=64)
    batches = [batch for window in windows for step in window for batch in step.batches]
    assert batches == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 1)]
    assert windows[-1][-1].stop == 11
    for window in windows[:-1]:  # windows end where a save falls, so the save sees complete data
        start = window[0].batches[0][0]
        assert any(start < save.chunks_done <= window[-1].stop for save in saves)


def test_one_batch_per_window_in_memory() -> None:
    windows = plan_windows(n_chunk=5, n_seq=2, group=Group(), saves=[], window_chunks=0)
    assert [[step.batches for step in window] for window in windows] == [[[(0, 2)]], [[(2, 2)]], [[(4, 1)]]]
