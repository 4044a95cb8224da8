"""Blocked causal attention on the CPU (`models.attention`): transformers' sdpa numbers, and sdpa
itself wherever blocks do not apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from imatrix.models import attention
from imatrix.models.attention import BLOCK_QUERIES, NAME, blocked_causal_attention
from imatrix.models.loader import load_model
from tiny_models import write_tiny_llama_gguf


class Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def qkv(n_tokens: int, heads: int, kv_heads: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    # as a model makes them: [b, n, heads, d] projections seen as [b, heads, n, d]
    return tuple(torch.randn(1, n_tokens, h, 32, generator=generator).transpose(1, 2)
                 for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize(("n_tokens", "heads", "kv_heads"), [(512, 9, 3), (200, 4, 4), (BLOCK_QUERIES + 1, 6, 2)])
def test_matches_one_causal_call(n_tokens: int, heads: int, kv_heads: int) -> None:
    query, key, value = qkv(n_tokens, heads, kv_heads)
    ours, weights = blocked_causal_attention(Layer(heads // kv_heads), query, key, value, None, scaling=0.2)
    reference = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.2,
                                               enable_gqa=heads != kv_heads).transpose(1, 2)
    assert weights is None and ours.shape == (1, n_tokens, heads, 32) and ours.is_contiguous()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_hands_other_calls_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    query, key, value = qkv(256, 4, 2)
    layer = Layer(2)
    mask = torch.rand(256, 256, generator=torch.Generator().manual_seed(1)) > 0.3
    handed: list[tuple] = []

    def recording_sdpa(*args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        handed.append(args)
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", recording_sdpa)
    short = qkv(BLOCK_QUERIES, 4, 2)
    for args, kwargs in (((query, key, value, mask), {}), ((query, key, value, None), {"is_causal": False}),
                         ((query, key, value, None), {"position_bias": torch.zeros(1, 4, 256, 256)}),
                         ((*short, None), {})):
        expected, _ = sdpa_attention_forward(layer, *args, **kwargs)
        ours, _ = blocked_causal_attention(layer, *args, **kwargs)
        assert handed.pop()[1] is args[0] and not handed
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_blocks_plain_causal_calls_spelled_out(monkeypatch: pytest.MonkeyPatch) -> None:
    query, key, value = qkv(256, 4, 2)
    monkeypatch.setattr(attention, "sdpa_attention_forward", None)  # a call handed over would fail
    ours, _ = blocked_causal_attention(Layer(2), query, key, value, None, dropout=0.0, softcap=None, is_causal=True)
    reference = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_loaded_models_use_it_and_keep_their_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf", dtype=np.float16))
    assert loaded.model.config._attn_implementation == NAME
    ids = torch.randint(0, loaded.config.vocab_size, (1, 3 * BLOCK_QUERIES), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        def no_fallback(*args: object, **kwargs: object) -> None:
            raise AssertionError("a whole chunk went to sdpa")

        monkeypatch.setattr(attention, "sdpa_attention_forward", no_fallback)
        blocked = loaded.model(input_ids=ids).logits
        monkeypatch.undo()
        loaded.model.set_attn_implementation("sdpa")
        whole = loaded.model(input_ids=ids).logits
    # The same sums, cut at other places: another CPU's sgemm kernels round the blocks' shorter key ranges
    # differently (2.8e-5 seen in CI); one key too many or too few moves these logits by ~6e-2.
    torch.testing.assert_close(blocked, whole, rtol=1e-4, atol=2e-4)


def test_sliding_window_models_keep_their_masks() -> None:
    """transformers builds masks only for attention functions it has mask functions for: without one,
    a sliding window would silently become plain causal attention."""
    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                                           layer_types=["sliding_attention", "sliding_attention"])
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 2 * BLOCK_QUERIES), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        windowed = model(input_ids=ids).logits
        assert attention.use_blocked_attention(model)
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, windowed, rtol=1e-5, atol=1e-5)
