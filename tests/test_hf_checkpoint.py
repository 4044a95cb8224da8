"""`-m <Hugging Face directory>`: a tiny random llama saved with transformers, collected under GGUF names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from imatrix import CollectOptions, ImatrixError, collect
from imatrix.cli.main import main
from imatrix.formats import load_imatrix
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.loader import load_model
from imatrix.models.tokenizer import tokenizer_from_gguf

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_KIND = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_q4_1: Path) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    # SmolLM2's own tokenizer, saved the Hugging Face way
    backend = tokenizer_from_gguf(GGUFModelFile(smollm2_q4_1)).tokenizer
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>").save_pretrained(directory)
    return directory


def brute_force_sum_sq(model: torch.nn.Module, chunks: np.ndarray) -> dict[str, np.ndarray]:
    """Σx² of every linear's input, captured by a plain forward with hooks of the test's own."""
    sums: dict[str, np.ndarray] = {}

    def capture(name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple) -> None:
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (rows * rows).sum(0).numpy()
        return hook

    handles = [module.register_forward_pre_hook(capture(name)) for name, module in model.named_modules()
               if name.rpartition(".")[2] in LINEARS]
    with torch.no_grad():
        for chunk in chunks:
            model(torch.from_numpy(chunk[None]))
    for handle in handles:
        handle.remove()
    return sums


def test_hf_directory_collects_under_gguf_names(tiny_llama_dir: Path, calibration_text: Path) -> None:
    loaded = load_model(tiny_llama_dir)
    result = collect(CollectOptions(model=loaded, file=calibration_text, ctx_size=64, batch_size=128, chunks=6))
    names = sorted(f"blk.{layer}.{kind}.weight" for layer in range(2) for kind in GGUF_KIND.values())
    assert result.matrix.names() == names
    text = calibration_text.read_text()[:-1]
    chunks = np.asarray(loaded.tokenizer.encode(text)[: 6 * 64]).reshape(6, 64)
    reference = brute_force_sum_sq(loaded.model, chunks)
    for module_name, expected in reference.items():
        layer, proj = module_name.split(".")[2], module_name.rpartition(".")[2]
        stats = result.matrix[f"blk.{layer}.{GGUF_KIND[proj]}.weight"]
        assert stats.counts.tolist() == [6 * 64]
        np.testing.assert_allclose(stats.sums[0], expected, rtol=1e-4)
    assert np.isfinite(result.ppl.ppl) and result.ppl.ppl > 1


def test_process_output_collects_untied_output_weight(tiny_llama_dir: Path, calibration_text: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "po.gguf"
    assert main(["-m", str(tiny_llama_dir), "-f", str(calibration_text), "-c", "64", "-b", "128", "--chunks", "4",
                 "--process-output", "-o", str(out), "-lv", "0"]) == 0

    matrix = load_imatrix(out)
    assert "output.weight" in matrix and matrix["output.weight"].counts.tolist() == [4 * 64]
    assert matrix["output.weight"].n_cols == 64


def test_unsupported_architecture_lists_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt_bigcode"}')
    with pytest.raises(ImatrixError, match=r"model_type 'gpt_bigcode' is not supported \(supported: .*llama"):
        load_model(tmp_path)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match="no config.json"):
        load_model(tmp_path)


def test_garbage_safetensors_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    from imatrix.models.open import open_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ImatrixError, match=r"model.safetensors: cannot read safetensors file"):
        load_model(broken)
    with pytest.raises(ImatrixError, match=r"model.safetensors: cannot read safetensors file"):
        open_model(broken, torch.device("cpu"))


def test_only_rank_0_shows_the_loading_bar(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    try:
        load_model(tiny_llama_dir)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
