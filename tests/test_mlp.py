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
    seen, gate_outputs = {}, {}
    for name, model in (("plain", plain), ("in place", in_place)):
        mlp = model.model.layers[0].mlp
        mlp.down_proj.register_forward_pre_hook(lambda _module, args, name=name: seen.__setitem__(name, args[0]))
        mlp.gate_proj.register_forward_hook(lambda _module, _args, out, name=name: gate_outputs.__setitem__(name, out))
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(in_place(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert torch.equal(seen["in place"], seen["plain"])
    # the product was written into the gate projection's output, not into new tensors
    assert seen["in place"].data_ptr() == gate_outputs["in place"].data_ptr()
    assert seen["plain"].data_ptr() != gate_outputs["plain"].data_ptr()


class ScaledMLP(transformers.models.llama.modeling_llama.LlamaMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)


def test_mlps_with_a_forward_of_their_own_keep_it() -> None:
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    model.model.layers[0].mlp.__class__ = ScaledMLP
    assert compute_mlps_in_place(model) == 1
    assert type(model.model.layers[0].mlp) is ScaledMLP
    assert isinstance(model.model.layers[1].mlp, InPlaceGatedMLP)


def test_with_autograd_the_models_own_forward_runs() -> None:
    plain, in_place = tiny_models()
    compute_mlps_in_place(in_place)
    ids = torch.randint(0, plain.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    for model in (plain, in_place):
        model(input_ids=ids).logits.sum().backward()
    torch.testing.assert_close(in_place.model.layers[0].mlp.gate_proj.weight.grad,
                               plain.model.layers[0].mlp.gate_proj.weight.grad, rtol=0, atol=0)
