"""Observed targets: inputs llama.cpp multiplies that no module takes (`models.observers`), and the
multi-head latent attention observer against the absorbed attention computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from imatrix.collection.hooks import ActivationCollector
from imatrix.collection.targets import collection_targets
from imatrix.models.architectures import ALL
from imatrix.models.loader import LoadedModel
from imatrix.models.names import gguf_name_map
from imatrix.models.observers import MatrixSink, ObservedTarget
from imatrix.models.patches import Handle

N_MAT, N_TOKENS, N_COLS = 3, 20, 5


class PassThroughObserver:
    """Hands a module's input `[n_seq, n_mat, n_tokens, n_cols]` to the sink as it is."""

    def find(self, model: torch.nn.Module, gguf_names: dict) -> dict[str, ObservedTarget]:
        return {}

    def attach(self, module: torch.nn.Module, names: dict[str, str], sink: MatrixSink) -> list[Handle]:
        return [module.register_forward_pre_hook(lambda _m, args: sink.observe_matrices(names["x"], args[0]))]


def test_matrices_are_summed_apart_with_one_count() -> None:
    """llama-imatrix's plain MUL_MAT of a 3-D weight: Σx² per matrix, one row of n_mat · n_cols, one count."""
    observed, dense = torch.nn.Identity(), torch.nn.Linear(N_COLS, 2)
    targets = {"blk.0.attn_k_b.weight": ObservedTarget(observed, "x", N_MAT, N_COLS, PassThroughObserver()),
               "blk.0.attn_q.weight": dense}
    batches = [torch.randn(n_seq, N_MAT, N_TOKENS, N_COLS, generator=torch.Generator().manual_seed(n_seq))
               for n_seq in (2, 1)]
    with ActivationCollector(targets) as collector, torch.inference_mode():
        for batch in batches:
            observed(batch)
            dense(batch[0, 0])
        matrix = collector.snapshot()
    stats = matrix["blk.0.attn_k_b.weight"]
    expected = sum(batch.double().square().sum(dim=(0, 2)) for batch in batches)  # [n_mat, n_cols]
    assert stats.sums.shape == (1, N_MAT * N_COLS) and stats.counts.tolist() == [3 * N_TOKENS]
    np.testing.assert_allclose(stats.sums.reshape(N_MAT, N_COLS), expected.numpy(), rtol=1e-6)
    assert matrix["blk.0.attn_q.weight"].counts.tolist() == [2 * N_TOKENS]


def tiny_mla(q_lora_rank: int | None) -> LoadedModel:
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=1, max_position_embeddings=64)
    config._attn_implementation = "eager"  # the reference reads the attention probabilities
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    architecture = next(arch for arch in ALL if arch.model_class == "DeepseekV3ForCausalLM" and not arch.is_variant)
    return LoadedModel(model, None, architecture, gguf_name_map(model, architecture, 1), Path("mla"))


def absorbed_inputs(loaded: LoadedModel, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """By hand: each head's q_nope and its attention-weighted sum of the latents, squared and summed."""
    attention = loaded.model.model.layers[0].self_attn
    captured = {}
    query = attention.q_proj if attention.q_proj is not None else attention.q_b_proj
    handles = [query.register_forward_hook(lambda _m, _a, out: captured.update(q=out)),
               attention.kv_a_layernorm.register_forward_hook(lambda _m, _a, out: captured.update(latents=out))]
    with torch.inference_mode():
        probs = loaded.model.model(input_ids=tokens, output_attentions=True, use_cache=False).attentions[0]
    for handle in handles:
        handle.remove()
    n_head = attention.num_heads
    q_nope = captured["q"].unflatten(-1, (n_head, -1))[..., : attention.qk_nope_head_dim]
    latent_output = probs @ captured["latents"][:, None]  # [n_seq, n_head, n_tokens, kv_lora_rank]
    return (q_nope.double().square().sum(dim=(0, 1)).numpy(), latent_output.double().square().sum(dim=(0, 2)).numpy())


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_latent_attention_measures_the_absorbed_matmul_inputs(q_lora_rank: int | None) -> None:
    loaded = tiny_mla(q_lora_rank)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain_logits = loaded.model(input_ids=tokens, use_cache=False).logits
    targets = collection_targets(loaded, False)
    assert {name: type(targets[name]).__name__ for name in ("blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight")} == {
        "blk.0.attn_k_b.weight": "ObservedTarget", "blk.0.attn_v_b.weight": "ObservedTarget"}
    with ActivationCollector(targets) as collector, torch.inference_mode():
        observed_logits = loaded.model(input_ids=tokens, use_cache=False).logits
        matrix = collector.snapshot()
    torch.testing.assert_close(observed_logits, plain_logits)  # the latents ride along, the values are the same
    q_nope, latent_output = absorbed_inputs(loaded, tokens)
    for name, expected in (("blk.0.attn_k_b.weight", q_nope), ("blk.0.attn_v_b.weight", latent_output)):
        assert matrix[name].counts.tolist() == [tokens.numel()]
        np.testing.assert_allclose(matrix[name].sums.reshape(expected.shape), expected, rtol=1e-5, err_msg=name)
    assert matrix["blk.0.attn_output.weight"].sums.shape == (1, 2 * 12)  # o_proj still sees the values alone
