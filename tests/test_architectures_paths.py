"""Every execution path gives the in-memory numbers for every architecture in `tests/architectures/`.

`test_architectures.py` checks the in-memory collection against llama.cpp; here the same tiny models go
through the other paths: layer by layer (`--sequential`, from the GGUF file and, where transformers has to
convert the checkpoint's tensors, from the checkpoint directory) and `imatrix perplexity`, in memory and layer
by layer.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from imatrix import CollectOptions, PerplexityOptions, collect, perplexity
from imatrix.collection.run import CollectResult
from imatrix.errors import ImatrixError
from imatrix.eval.perplexity import PerplexityResult
from imatrix.pipeline.executors import open_executor
from imatrix.pipeline.sequential import SequentialExecutor

HERE = Path(__file__).resolve().parent / "architectures"
GGUF_NAMES = sorted(path.parent.name for path in HERE.glob("*/model.gguf"))
# checkpoints whose tensors transformers converts on loading (routers renamed, experts stacked or fused,
# MXFP4 experts): the layer-by-layer path makes each parameter as `from_pretrained` does
CONVERTED_CHECKPOINTS = ["deepseek2", "deepseek2-v2", "ernie4_5-moe", "gpt-oss", "granitemoe", "granitehybrid",
                         "minimax-m2", "mixtral", "phimoe"]
# multimodal checkpoints, whose text model's tensors are renamed on loading (`models.weights.TEXT_MODEL_KEYS`)
MULTIMODAL_CHECKPOINTS = ["gemma3-vl", "gemma3n-vl", "gemma4-vl", "lfm2-vl", "llama4-vl", "llava-vl",
                          "mistral-small3-vl", "mistral3-vl", "qwen35-vl"]
N_CTX, N_CHUNKS = 64, 3


def run(model: object, text: Path, **options: object) -> CollectResult:
    # one chunk per -b batch and two per window: the window's batches take turns in each layer, and the
    # second window loads every layer again
    settings = {"ctx_size": N_CTX, "batch_size": N_CTX, "chunks": N_CHUNKS, **options}
    return collect(CollectOptions(model=model, file=text, **settings))


def evaluate(model: Path, text: Path, **options: object) -> PerplexityResult:
    return perplexity(PerplexityOptions(model=model, file=text, ctx_size=N_CTX, chunks=N_CHUNKS, **options))


@functools.cache
def in_memory(model: Path, text: Path) -> CollectResult:
    return run(model, text, sequential=False)


@functools.cache
def perplexity_in_memory(model: Path, text: Path) -> PerplexityResult:
    return evaluate(model, text, sequential=False)


def assert_same(ours: CollectResult, reference: CollectResult) -> None:
    assert ours.matrix.names() == reference.matrix.names()
    for name in reference.matrix:
        assert ours.matrix[name].counts.tolist() == reference.matrix[name].counts.tolist(), name
        np.testing.assert_allclose(ours.matrix[name].sums, reference.matrix[name].sums, rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(ours.chunk_ppl, reference.chunk_ppl, rtol=1e-4)


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_sequential_gguf_matches_in_memory(name: str, text: Path) -> None:
    model = HERE / name / "model.gguf"
    assert_same(run(model, text, sequential=True, window_chunks=2), in_memory(model, text))


@pytest.mark.parametrize("name", [name for name in CONVERTED_CHECKPOINTS + MULTIMODAL_CHECKPOINTS
                                  if (HERE / name / "hf").is_dir()])
def test_sequential_checkpoint_matches_in_memory(name: str, text: Path) -> None:
    model = HERE / name / "hf"
    assert_same(run(model, text, sequential=True, window_chunks=2), in_memory(model, text))


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_perplexity_matches_collect(name: str, text: Path) -> None:
    model = HERE / name / "model.gguf"
    result = perplexity_in_memory(model, text)
    reference = in_memory(model, text)
    np.testing.assert_allclose(result.chunk_ppl, reference.chunk_ppl, rtol=1e-4)
    assert result.ppl == pytest.approx(reference.ppl.final()[0], rel=1e-4)


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_sequential_perplexity_matches_in_memory(name: str, text: Path) -> None:
    model = HERE / name / "model.gguf"
    ours, reference = evaluate(model, text, sequential=True, window_chunks=2), perplexity_in_memory(model, text)
    np.testing.assert_allclose(ours.chunk_ppl, reference.chunk_ppl, rtol=1e-5)
    assert (ours.nll, ours.n_tokens) == (pytest.approx(reference.nll, rel=1e-5), reference.n_tokens)


def test_a_decoder_that_skips_its_layers_is_refused(text: Path) -> None:
    executor = sequential_llama()
    decoder = executor.loaded.decoder
    decoder.forward = lambda input_ids, **kwargs: BaseModelOutputWithPast(decoder.embed_tokens(input_ids))
    with pytest.raises(ImatrixError, match="--sequential is not supported for llama models: its forward returned "
                                           "before layer 0"):
        run(executor, text)
    assert not _waiting_forwards()


def test_an_error_in_a_layer_ends_every_forward(text: Path) -> None:
    executor = sequential_llama()

    def fail(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        raise ValueError("broken layer")

    executor.loaded.decoder.layers[1].register_forward_hook(fail)
    with pytest.raises(ValueError, match="broken layer"):
        run(executor, text, batch_size=4 * N_CTX, chunks=4)
    assert not _waiting_forwards()
    assert all(param.is_meta for param in executor.loaded.model.parameters())


def sequential_llama() -> SequentialExecutor:
    return open_executor(HERE / "llama" / "model.gguf", torch.device("cpu"), torch.float32, sequential=True)


def _waiting_forwards() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "imatrix-sequential"]
