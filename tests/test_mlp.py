"""Gated MLPs computed in place: the same bits as transformers' forward, autograd left alone."""

from __future__ import annotations

import torch
import transformers

from imatrix.models.mlp import InPlaceGatedMLP, compute_mlps_in_place
from tiny_models import tiny_llama_config, tiny_llama_state


def tiny_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    config = tiny_llama_config()
    models = []
    for _ in range(2):
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(tiny_llama_state(config), strict=False)
        models.append(model.eval())
    return models[0], models[1]


def test_in_place_mlps_give_the_same_bits_and_feed_the_down_projection_the_same_input() -> None:
    plain, in_place = tiny_models()
    assert compute_mlps_in_place(in_place) == 2 and compute_mlps_in_place(in_place) == 0  # once
    assert isinstance(in_place.model.layers[1].mlp, InPlaceGatedMLP)
    seen = {}
    for name, model in (("plain", plain), ("in place", in_place)):
        model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda _module, args, name=name: seen.__setitem__(name, args[0].clone()))
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(in_place(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert torch.equal(seen["in place"], seen["plain"])


def test_with_autograd_the_models_own_forward_runs() -> None:
    plain, in_place = tiny_models()
    compute_mlps_in_place(in_place)
    ids = torch.randint(0, plain.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    for model in (plain, in_place):
        model(input_ids=ids).logits.sum().backward()
    torch.testing.assert_close(in_place.model.layers[0].mlp.gate_proj.weight.grad,
                               plain.model.layers[0].mlp.gate_proj.weight.grad, rtol=0, atol=0)
