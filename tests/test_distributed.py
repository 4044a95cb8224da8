"""torch.distributed: two gloo ranks under torchrun give the single-process file, perplexity and KL divergence."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imatrix import CollectOptions, PerplexityOptions, Reporter, collect, perplexity
from imatrix.collection.saves import llama_cpp_saves, save_points, snapshot_cuts
from imatrix.eval.logits_file import LogitsFile
from imatrix.formats import load_imatrix
from imatrix.metrics import u16_log_probs
from imatrix.models.bundled import default_calibration_text
from imatrix.pipeline.distributed import Group
from imatrix.pipeline.windows import plan_windows
from tiny_models import write_tiny_llama_gguf

N_CTX = 32
# 9 chunks in batches of 2: rank 1 has nothing to do in the last step
SHAPE = ["-c", str(N_CTX), "-b", str(2 * N_CTX), "--chunks", "9", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_ranks(*args: str) -> subprocess.CompletedProcess[str]:
    """`imatrix *args` launched by torchrun as two gloo ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "imatrix.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = tmp_path_factory.mktemp("text") / "calibration.txt"
    text.write_bytes(default_calibration_text().read_bytes()[:6_000])
    return text


def printed_ppl(stdout: str) -> list[float]:
    return [float(value) for value in re.findall(r"\[\d+\]([0-9.]+),", stdout)]


def test_two_gloo_ranks_match_one_process(tmp_path: Path, calibration: Path) -> None:
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "two_ranks.gguf"
    done = two_ranks("-m", str(model), "-f", str(calibration), *SHAPE, "--process-output", "-ofreq", "4", "-lv", "3",
                     "--dtype", "float32", "-o", str(out))

    printed: list[str] = []
    options = CollectOptions(model=model, file=calibration, ctx_size=N_CTX, batch_size=2 * N_CTX, chunks=9,
                             process_output=True, output_file=tmp_path / "one.gguf", output_frequency=4,
                             device="cpu")
    single = collect(options, Reporter(output=printed.append))

    ours, reference = load_imatrix(out), single.matrix
    assert (ours.names(), ours.chunk_count, ours.datasets) == (reference.names(), 9, reference.datasets)
    assert "output.weight" in ours
    for name in reference:
        assert ours[name].counts.tolist() == reference[name].counts.tolist(), name
        np.testing.assert_allclose(ours[name].sums, reference[name].sums, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(printed_ppl(done.stdout), single.chunk_ppl, rtol=1e-4)
    final = re.findall(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done.stdout)
    assert len(final) == 1  # rank 0 alone prints
    np.testing.assert_allclose([float(v) for v in final[0]], single.ppl.final(), rtol=1e-4)
    assert done.stderr.count("save_imatrix: stored collected data after 9 chunks") == 1


def test_perplexity_and_kl_divergence_on_two_ranks_match_one_process(tmp_path: Path, calibration: Path) -> None:
    """The base file rank 0 writes holds every rank's chunks; KL divergence runs layer by layer on the ranks."""
    base_model = write_tiny_llama_gguf(tmp_path / "base.gguf")
    other_model = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=1)
    two_base = tmp_path / "two.kld"
    done = two_ranks("perplexity", "-m", str(base_model), "-f", str(calibration), *SHAPE,
                     "--kl-divergence-base", str(two_base))
    printed: list[str] = []
    one_base = tmp_path / "one.kld"
    single = perplexity(PerplexityOptions(model=base_model, file=calibration, ctx_size=N_CTX, batch_size=2 * N_CTX,
                                          chunks=9, kl_divergence_base=one_base, device="cpu"),
                        Reporter(output=printed.append))
    np.testing.assert_allclose(printed_ppl(done.stdout), single.chunk_ppl, rtol=1e-5)
    assert done.stdout.count("Final estimate") == 1
    ours, theirs = LogitsFile(two_base), LogitsFile(one_base)
    assert ours.header == theirs.header and (ours.tokens == theirs.tokens).all()
    for chunk in range(9):
        np.testing.assert_allclose(u16_log_probs(ours.chunk_rows(chunk), ours.header.n_vocab),
                                   u16_log_probs(theirs.chunk_rows(chunk), theirs.header.n_vocab), atol=1e-3)

    done = two_ranks("perplexity", "-m", str(other_model), "-b", str(2 * N_CTX), "--device", "cpu", "--sequential",
                     "--kl-divergence", "--kl-divergence-base", str(one_base))
    single = perplexity(PerplexityOptions(model=other_model, batch_size=2 * N_CTX, kl_divergence_base=one_base,
                                          kl_divergence=True, device="cpu"))
    table = re.findall(r"^ *(\d+) +([0-9.]+) ± ", done.stdout, re.M)  # chunk, running PPL(Q)
    assert [int(row[0]) for row in table] == list(range(1, 10))
    mean_kld = float(re.search(r"Mean    KLD: +([0-9.]+)", done.stdout).group(1))
    assert single.mean_kld > 1e-3 and mean_kld == pytest.approx(single.mean_kld, abs=1e-6)
    assert float(table[-1][1]) == pytest.approx(single.ppl, rel=1e-4)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_windows_cover_every_batch_once(world: int) -> None:
    saves = llama_cpp_saves(n_chunk=11, n_ctx=N_CTX, n_seq=2, n_batch=2 * N_CTX, base_tokens=0,
                            output_frequency=4, save_frequency=0)
    windows = plan_windows(n_chunk=11, n_seq=2, group=Group(0, world), window_chunks=64, cuts=snapshot_cuts(saves),
                           ends=save_points(saves))
    batches = [batch for window in windows for step in window for batch in step.batches]
    assert batches == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 1)]
    assert windows[-1][-1].stop == 11
    for window in windows[:-1]:  # windows end where a save falls, so the save sees complete data
        start = window[0].batches[0][0]
        assert any(start < save.chunks_done <= window[-1].stop for save in saves)


def test_one_batch_per_window_in_memory() -> None:
    windows = plan_windows(n_chunk=5, n_seq=2, group=Group(), window_chunks=0)
    assert [[step.batches for step in window] for window in windows] == [[[(0, 2)]], [[(2, 2)]], [[(4, 1)]]]
