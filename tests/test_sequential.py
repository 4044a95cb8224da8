"""Layer-by-layer execution (`--sequential`) gives the in-memory numbers, and frees what it loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from imatrix import CollectOptions, ImportanceMatrix, PerplexityOptions, collect, perplexity
from imatrix.cli.main import main
from imatrix.collection.run import CollectResult
from imatrix.eval.logits_file import LogitsFile
from imatrix.formats import load_imatrix
from imatrix.metrics import u16_log_probs
from imatrix.models.loader import load_model
from imatrix.models.open import open_model
from imatrix.pipeline import sequential
from imatrix.pipeline.executors import InMemoryExecutor, open_executor
from imatrix.pipeline.sequential import SequentialExecutor
from tiny_models import tiny_llama_config, write_tiny_llama_gguf, write_tiny_llama_hf

N_CTX = 32


@pytest.fixture(scope="module")
def tiny_tied_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tied.gguf", tiny_llama_config(tied=True), seed=1)


def run(model: object, text: Path, **options: object) -> CollectResult:
    settings = {"ctx_size": N_CTX, "batch_size": 2 * N_CTX, "chunks": 12, "dataset_name": "calibration.txt",
                **options}
    return collect(CollectOptions(model=model, file=text, **settings))


def assert_same_statistics(ours: ImportanceMatrix, reference: ImportanceMatrix, min_cosine: float = 0.99999) -> None:
    assert ours.names() == reference.names()
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (reference.chunk_count, reference.chunk_size,
                                                                   reference.datasets)
    for name in reference:
        assert ours[name].counts.tolist() == reference[name].counts.tolist(), name
        a, b = ours[name].sums.ravel().astype(np.float64), reference[name].sums.ravel().astype(np.float64)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= min_cosine, name


def assert_same_ppl(ours: CollectResult, reference: CollectResult, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(ours.chunk_ppl, reference.chunk_ppl, rtol=rtol)
    np.testing.assert_allclose(ours.ppl.final(), reference.ppl.final(), rtol=rtol)


@pytest.mark.parametrize("window_chunks", [1, 5, 64])
def test_gguf_matches_in_memory(tiny_gguf: Path, text: Path, window_chunks: int) -> None:
    reference = run(tiny_gguf, text, sequential=False, process_output=True)
    ours = run(tiny_gguf, text, sequential=True, process_output=True, window_chunks=window_chunks)
    assert "output.weight" in ours.matrix
    assert_same_statistics(ours.matrix, reference.matrix)
    assert_same_ppl(ours, reference)


def test_tied_embeddings(tiny_tied_gguf: Path, text: Path) -> None:
    reference = run(tiny_tied_gguf, text, sequential=False, process_output=True)
    ours = run(tiny_tied_gguf, text, sequential=True, process_output=True, window_chunks=4)
    assert "output.weight" not in ours.matrix
    assert_same_statistics(ours.matrix, reference.matrix)
    assert_same_ppl(ours, reference)


def test_hf_directory_matches_in_memory(tmp_path: Path, text: Path) -> None:
    directory = write_tiny_llama_hf(tmp_path / "hf")
    in_memory = load_model(directory)
    reference = run(in_memory, text)
    ours = run(directory, text, sequential=True, window_chunks=3)
    assert_same_statistics(ours.matrix, reference.matrix)
    assert_same_ppl(ours, reference)


def test_bfloat16_compute(tiny_gguf: Path, text: Path) -> None:
    reference = run(tiny_gguf, text, sequential=False, dtype=torch.bfloat16)
    ours = run(tiny_gguf, text, sequential=True, dtype=torch.bfloat16, window_chunks=4)
    assert_same_statistics(ours.matrix, reference.matrix)
    assert_same_ppl(ours, reference)
    full = run(tiny_gguf, text, sequential=False)
    assert all(ours.matrix[name].sums.dtype == np.float32 for name in ours.matrix)
    assert_same_statistics(ours.matrix, full.matrix, min_cosine=0.999)


def test_saves_match_in_memory(tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    saved = {}
    for mode in (False, True):
        out = tmp_path / f"{mode}.gguf"
        run(tiny_gguf, text, sequential=mode, window_chunks=64, output_file=out, output_frequency=3,
            save_frequency=4)
        saved[mode] = sorted(path.name.removeprefix(f"{mode}.gguf") for path in tmp_path.glob(f"{mode}.gguf*"))
        for suffix in saved[mode]:
            if mode:
                assert_same_statistics(load_imatrix(tmp_path / f"True.gguf{suffix}"),
                                       load_imatrix(tmp_path / f"False.gguf{suffix}"))
    assert saved[True] == saved[False] == ["", ".at_12", ".at_4", ".at_8"]


def test_layers_are_freed_after_use(tiny_gguf: Path, text: Path) -> None:
    executor = open_executor(tiny_gguf, torch.device("cpu"), torch.float32, sequential=True)
    run(executor, text, chunks=4)
    assert all(param.is_meta for param in executor.loaded.model.parameters())


def test_chosen_automatically_when_weights_do_not_fit(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, float32 = torch.device("cpu"), torch.float32
    assert isinstance(open_executor(tiny_gguf, cpu, float32), InMemoryExecutor)
    tiny_bytes = sequential.weight_bytes(open_model(tiny_gguf), float32)
    monkeypatch.setattr(sequential, "available_memory", lambda device: tiny_bytes)
    assert isinstance(open_executor(tiny_gguf, cpu, float32), SequentialExecutor)
    assert isinstance(open_executor(tiny_gguf, cpu, float32, sequential=False), InMemoryExecutor)


def test_weight_bytes_counts_every_value(tiny_gguf: Path) -> None:
    model = load_model(tiny_gguf).model
    n_values = sum(tensor.numel() for tensor in model.state_dict().values())
    assert sequential.weight_bytes(open_model(tiny_gguf), torch.bfloat16) == 2 * n_values
    assert sequential.available_memory(torch.device("cpu")) > 0


def test_cli_flags(tiny_gguf: Path, text: Path, tmp_path: Path) -> None:
    common = ["-m", str(tiny_gguf), "-f", str(text), "-c", str(N_CTX), "-b", str(2 * N_CTX), "--chunks", "6",
              "-lv", "0", "--no-ppl"]
    assert main([*common, "-o", str(tmp_path / "a.gguf"), "--no-sequential"]) == 0
    assert main([*common, "-o", str(tmp_path / "b.gguf"), "--sequential", "--window-chunks", "2",
                 "--dtype", "float32"]) == 0
    a, b = load_imatrix(tmp_path / "a.gguf"), load_imatrix(tmp_path / "b.gguf")
    assert a.datasets == b.datasets
    assert_same_statistics(b, a)


def test_hf_moe_experts_stored_apart(tmp_path: Path, text: Path) -> None:
    """A MoE checkpoint keeps each expert's matrices apart; the skeleton wants transformers' fused 3-D ones."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=tiny_llama_config().vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    directory = write_tiny_llama_hf(tmp_path / "hf")  # for the tokenizer files
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(directory)
    in_memory = load_model(directory)
    reference = run(in_memory, text, chunks=4)
    ours = run(directory, text, sequential=True, chunks=4, window_chunks=2)
    assert_same_statistics(ours.matrix, reference.matrix)
    assert_same_ppl(ours, reference)


@pytest.mark.slow
def test_smollm2_matches_in_memory(smollm2_q4_1: Path, calibration_text: Path) -> None:
    options = {"ctx_size": 128, "batch_size": 256, "chunks": 6, "process_output": True}
    reference = run(smollm2_q4_1, calibration_text, sequential=False, **options)
    ours = run(smollm2_q4_1, calibration_text, sequential=True, window_chunks=4, **options)
    assert_same_statistics(ours.matrix, reference.matrix)
    assert_same_ppl(ours, reference)


@pytest.mark.parametrize("window_chunks", [1, 64])
def test_perplexity_and_kl_divergence_match_in_memory(tiny_gguf: Path, tiny_tied_gguf: Path, text: Path,
                                                      tmp_path: Path, window_chunks: int) -> None:
    """`imatrix perplexity --sequential`: the same PPL, base log-probabilities and KL divergence as in memory."""
    common = {"ctx_size": N_CTX, "batch_size": 2 * N_CTX, "chunks": 9}
    results = {}
    for mode in (False, True):
        base = tmp_path / f"{mode}.kld"
        options = PerplexityOptions(model=tiny_gguf, file=text, kl_divergence_base=base, sequential=mode,
                                    window_chunks=window_chunks, **common)
        ppl = perplexity(options)
        # tiny_tied_gguf: another model with the same vocabulary
        kld = perplexity(PerplexityOptions(model=tiny_tied_gguf, kl_divergence_base=tmp_path / "False.kld",
                                           kl_divergence=True, sequential=mode, window_chunks=window_chunks,
                                           **common))
        results[mode] = ppl, kld, LogitsFile(base)
    (ppl, kld, base), (reference_ppl, reference_kld, reference_base) = results[True], results[False]
    np.testing.assert_allclose(ppl.chunk_ppl, reference_ppl.chunk_ppl, rtol=1e-5)
    assert ppl.n_tokens == reference_ppl.n_tokens == 9 * (N_CTX // 2 - 1)
    assert base.header == reference_base.header and (base.tokens == reference_base.tokens).all()
    for chunk in range(9):
        np.testing.assert_allclose(u16_log_probs(base.chunk_rows(chunk), base.header.n_vocab),
                                   u16_log_probs(reference_base.chunk_rows(chunk), base.header.n_vocab), atol=1e-4)
    assert kld.count == reference_kld.count and kld.mean_kld > 1e-3
    assert kld.mean_kld == pytest.approx(reference_kld.mean_kld, rel=1e-4)
    assert kld.ppl == pytest.approx(reference_kld.ppl, rel=1e-5)
    np.testing.assert_allclose(kld.kld_values, reference_kld.kld_values, atol=1e-5)
