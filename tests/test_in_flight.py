"""Several chunks through the model at once (`pipeline.in_flight`): the same statistics and perplexity
as one at a time, whichever thread finishes first, and nothing left changed behind."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from imatrix import CollectOptions, collect
from imatrix.cli.main import main
from imatrix.collection.hooks import ActivationCollector
from imatrix.collection.run import CollectResult
from imatrix.collection.targets import collection_targets
from imatrix.formats import load_imatrix
from imatrix.models.loader import LoadedModel, load_model
from imatrix.models.open import open_model
from imatrix.pipeline.executors import InMemoryExecutor
from imatrix.pipeline.sequential import SequentialExecutor

N_CTX = 32


@pytest.fixture(scope="module")
def model(tiny_gguf: Path) -> LoadedModel:
    return load_model(tiny_gguf)


def run(model: LoadedModel, text: Path, **options: object) -> CollectResult:
    settings = {"ctx_size": N_CTX, "batch_size": 2 * N_CTX, "chunks": 11, **options}
    return collect(CollectOptions(model=model, file=text, **settings))


@pytest.mark.parametrize("n_slots", [2, 3])
def test_same_numbers_as_one_chunk_at_a_time(model: LoadedModel, text: Path, n_slots: int) -> None:
    alone = run(model, text, chunks_in_flight=1)
    together = run(model, text, chunks_in_flight=n_slots)
    assert together.matrix.names() == alone.matrix.names() and len(alone.matrix) == 2 * 7
    for name in alone.matrix:
        assert together.matrix[name].counts.tolist() == alone.matrix[name].counts.tolist() == [11 * N_CTX]
        np.testing.assert_allclose(together.matrix[name].sums, alone.matrix[name].sums, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(together.chunk_ppl, alone.chunk_ppl, rtol=1e-6)
    assert len(together.chunk_ppl) == 11


def test_the_result_does_not_depend_on_thread_timing_or_batch_size(model: LoadedModel, text: Path) -> None:
    # chunk c adds into slot c % n in chunk order, a sequence at a time, whatever -b groups and whichever
    # thread runs first
    forward_sizes: dict[int, list[int]] = {}
    hook = model.model.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: forward_sizes[n_batch].append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    runs = []
    for n_batch in (N_CTX, 2 * N_CTX, 4 * N_CTX, N_CTX):
        forward_sizes[n_batch] = []
        runs.append(run(model, text, chunks_in_flight=2, batch_size=n_batch))
    hook.remove()
    # a -b batch's chunks are shared among the slots, at most two per forward: batches of 4, 4 and 3
    assert sorted(forward_sizes[4 * N_CTX]) == [1, 2, 2, 2, 2, 2]
    assert forward_sizes[2 * N_CTX] == forward_sizes[N_CTX] == [1] * 11
    # the same -b again, with its threads timed otherwise: the same bits
    for name in runs[0].matrix:
        np.testing.assert_array_equal(runs[3].matrix[name].sums, runs[0].matrix[name].sums, err_msg=name)
    assert runs[3].chunk_ppl == runs[0].chunk_ppl
    # other -b: forwards of two sequences, which MKL's AVX-512 sgemm rounds as two of one (the same bits
    # here), and other kernels not quite (AVX2: 4e-7 seen; CI's CPU rounded 40× more than that elsewhere);
    # a chunk lost or counted twice moves a sum by ~10%
    for other in runs[1:3]:
        for name in runs[0].matrix:
            np.testing.assert_allclose(other.matrix[name].sums, runs[0].matrix[name].sums, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(other.chunk_ppl, runs[0].chunk_ppl, rtol=1e-4)


def test_saves_hold_every_chunk_before_them(model: LoadedModel, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "imatrix.gguf"
    run(model, text, chunks_in_flight=2, batch_size=N_CTX, output_file=out, output_frequency=3, save_frequency=3,
        chunks=7)
    reference = run(model, text, chunks_in_flight=1, batch_size=N_CTX, chunks=6).matrix
    saved = load_imatrix(tmp_path / "imatrix.gguf.at_6")
    assert saved.chunk_count == 6
    for name in reference:
        assert saved[name].counts.tolist() == reference[name].counts.tolist()
        np.testing.assert_allclose(saved[name].sums, reference[name].sums, rtol=1e-5)


def test_threads_are_given_back(model: LoadedModel, text: Path) -> None:
    before = torch.get_num_threads()
    run(model, text, chunks_in_flight=2, chunks=4)
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert torch.get_num_threads() == before and seen == [before]


def test_only_a_model_in_memory_on_the_cpu_runs_several(model: LoadedModel, tiny_gguf: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    in_memory = InMemoryExecutor(model)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert in_memory.chunks_in_flight(0) == 2
    assert in_memory.chunks_in_flight(3) == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert in_memory.chunks_in_flight(0) == 1
    layer_by_layer = SequentialExecutor(open_model(tiny_gguf), torch.device("cpu"), torch.float32, 8)
    assert layer_by_layer.chunks_in_flight(2) == 1


def test_snapshots_add_every_slot(model: LoadedModel) -> None:
    targets = collection_targets(model, process_output=False)
    generator = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, model.config.vocab_size, (1, 16), generator=generator) for _ in range(2)]
    with ActivationCollector(targets) as collector, torch.inference_mode():
        model.model(input_ids=ids[0])
        alone = collector.snapshot()
        collector.use_slots(2)

        def second_slot() -> None:
            with collector.in_slot(1), torch.inference_mode():
                model.model(input_ids=ids[1])

        worker = threading.Thread(target=second_slot)
        worker.start()
        worker.join()
        both = collector.snapshot()
    with ActivationCollector(targets) as reference, torch.inference_mode():
        model.model(input_ids=ids[1])
        second = reference.snapshot()
    for name in targets:
        assert both[name].counts.tolist() == [32] and alone[name].counts.tolist() == [16]
        np.testing.assert_allclose(both[name].sums, alone[name].sums + second[name].sums, rtol=1e-6)


def test_cli_rejects_a_negative_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--chunks-in-flight", "-1", "-o", str(tmp_path / "x.gguf")]) == 1
    assert "--chunks-in-flight must be >= 0 (got -1)" in capsys.readouterr().err


def test_routed_experts_count_each_threads_own_tokens(golden: Path) -> None:
    # the MoE adapter keeps the routing between the expert call and the down projection per thread
    moe = load_model(golden / "moe" / "tiny-qwen3moe-f16.gguf")
    text = golden.parent / "data" / "calibration.txt"
    results = [collect(CollectOptions(model=moe, file=text, ctx_size=128, chunks=8, ppl=False, chunks_in_flight=n))
               for n in (1, 2)]
    experts = [name for name in results[0].matrix if results[0].matrix[name].n_mat > 1]
    assert len(experts) == 3 * moe.config.num_hidden_layers
    for name in experts:
        assert results[1].matrix[name].counts.tolist() == results[0].matrix[name].counts.tolist(), name


def test_a_moe_models_statistics_do_not_depend_on_batch_size(golden: Path) -> None:
    # its routers and experts see the tokens of a forward's sequences flattened together: one per forward
    moe = load_model(golden / "moe" / "tiny-qwen3moe-f16.gguf")
    text = golden.parent / "data" / "calibration.txt"
    runs = [collect(CollectOptions(model=moe, file=text, ctx_size=128, batch_size=n_batch, chunks=6,
                                   chunks_in_flight=2))
            for n_batch in (128, 512)]
    for name in runs[0].matrix:
        np.testing.assert_array_equal(runs[1].matrix[name].sums, runs[0].matrix[name].sums, err_msg=name)
    assert runs[1].chunk_ppl == runs[0].chunk_ppl


def test_an_error_stops_the_other_slots_after_their_chunk() -> None:
    import time

    from imatrix.pipeline.in_flight import ChunksInFlight

    done: list[int] = []

    def work(group: list[int]) -> list[int]:
        (chunk,) = group
        time.sleep(0.05)
        if chunk == 2:  # slot 0's second chunk: slot 1 is busy by then
            raise KeyboardInterrupt  # Ctrl-C reaching the chunk's thread, or any error there
        done.append(chunk)
        return group

    with pytest.raises(KeyboardInterrupt), ChunksInFlight(2, lambda slot: contextlib.nullcontext(), 2) as pool:
        pool.map(work, list(range(40)))
    assert 0 < len([chunk for chunk in done if chunk % 2]) < 10  # slot 1 stopped early, not after its 20
