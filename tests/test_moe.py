"""MoE collection: per-expert Σx² and counts against a brute-force reference, and against llama.cpp."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from imatrix import CollectOptions, ImportanceMatrix, Reporter, collect
from imatrix.cli.main import main
from imatrix.collection.hooks import ActivationCollector
from imatrix.collection.moe import ExpertTarget, expert_count_lines, expert_token_counts
from imatrix.collection.targets import collection_targets
from imatrix.formats import load_imatrix, partial_data_warnings, save_imatrix
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures import ALL, Architecture
from imatrix.models.loader import LoadedModel, load_model
from imatrix.models.names import expert_stack_map, gguf_name_map
from tiny_models import BOS, _hf_tokenizer, permute_rows, tiny_vocab, write_metadata

HIDDEN, N_LAYERS, N_CTX, N_SEQ = 64, 2, 48, 2
COMMON = dict(vocab_size=len(tiny_vocab()), hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5)


def qwen3moe() -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)


def qwen2moe() -> transformers.PretrainedConfig:
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)


def mixtral() -> transformers.PretrainedConfig:
    return transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)


def deepseek_v3() -> transformers.PretrainedConfig:
    return transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4}, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


ADAPTERS = {arch.model_class: arch for arch in ALL}
# config, adapter (llama.cpp converts Mixtral as llama, DeepSeek-V3 as deepseek2), MoE blocks, shared experts
CASES: dict[str, tuple[Callable[[], transformers.PretrainedConfig], Architecture, list[int], bool]] = {
    "qwen3moe": (qwen3moe, ADAPTERS["Qwen3MoeForCausalLM"], [0, 1], False),
    "qwen2moe": (qwen2moe, ADAPTERS["Qwen2MoeForCausalLM"], [0, 1], True),
    "mixtral": (mixtral, ADAPTERS["MixtralForCausalLM"], [0, 1], False),
    "deepseek_v3": (deepseek_v3, ADAPTERS["DeepseekV3ForCausalLM"], [1], True),
}


def tiny_moe(case: str, seed: int = 0) -> LoadedModel:
    make_config, architecture, _, _ = CASES[case]
    config = make_config()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # the default init leaves routers at zero (ties everywhere); spread everything out
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight")
                        else 0.15 * torch.randn_like(param))
    assert type(model).__name__ == architecture.model_class
    names = gguf_name_map(model, architecture, N_LAYERS)
    return LoadedModel(model, None, architecture, names, Path(case))


def run_collector(loaded: LoadedModel, batches: list[torch.Tensor]) -> ImportanceMatrix:
    with ActivationCollector(collection_targets(loaded, False)) as collector, torch.inference_mode():
        for batch in batches:
            loaded.model.model(input_ids=batch, use_cache=False)
            collector.end_batch()
        return collector.snapshot()


def moe_inputs(loaded: LoadedModel, blocks: list[int], batches: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """The hidden states entering each MoE block (`mlp`), token rows concatenated over batches."""
    captured: dict[int, list[torch.Tensor]] = {block: [] for block in blocks}
    layers = loaded.model.model.layers
    handles = [layers[block].mlp.register_forward_pre_hook(
        lambda _m, args, block=block: captured[block].append(args[0].reshape(-1, HIDDEN).clone()))
        for block in blocks]
    with torch.inference_mode():
        for batch in batches:
            loaded.model.model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {block: torch.cat(rows) for block, rows in captured.items()}


def reference(mlp: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Brute force: route every token, run each of its experts by hand, square and sum per expert."""
    with torch.inference_mode():
        logits, _, top_k = mlp.gate(x)
        if isinstance(mlp.gate, transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter):
            assert torch.equal(top_k.sort().values, logits.softmax(-1).topk(top_k.shape[1]).indices.sort().values)
        experts = mlp.experts
        n_expert, n_ff = experts.down_proj.shape[0], experts.down_proj.shape[2]
        inputs, downs = np.zeros((n_expert, HIDDEN)), np.zeros((n_expert, n_ff))
        counts = np.zeros(n_expert, dtype=np.int64)
        for expert in range(n_expert):
            rows = x[(top_k == expert).any(dim=1)].double()
            gate_up = experts.gate_up_proj[expert].double()
            hidden = torch.nn.functional.silu(rows @ gate_up[:n_ff].T) * (rows @ gate_up[n_ff:].T)
            inputs[expert], downs[expert] = rows.square().sum(0), hidden.square().sum(0)
            counts[expert] = rows.shape[0]
    return {"gate": (inputs, counts), "up": (inputs, counts), "down": (downs, counts)}


def batches_for(loaded: LoadedModel, n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, loaded.config.vocab_size, (N_SEQ, N_CTX), generator=generator) for _ in range(n)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_expert_sums_match_brute_force(case: str) -> None:
    loaded = tiny_moe(case)
    _, _, blocks, shared = CASES[case]
    batches = batches_for(loaded)
    ours = run_collector(loaded, batches)
    n_tokens = len(batches) * N_SEQ * N_CTX
    top_k = loaded.config.num_experts_per_tok
    for block, x in moe_inputs(loaded, blocks, batches).items():
        expected = reference(loaded.model.model.layers[block].mlp, x)
        for kind, (sums, counts) in expected.items():
            stats = ours[f"blk.{block}.ffn_{kind}_exps.weight"]
            assert stats.counts.tolist() == counts.tolist()
            np.testing.assert_allclose(stats.sums, sums, rtol=2e-5, atol=1e-6)
            assert stats.counts.sum() == n_tokens * top_k
        router = ours[f"blk.{block}.ffn_gate_inp.weight"]
        assert router.counts.tolist() == [n_tokens]
        np.testing.assert_allclose(router.sums[0], x.double().square().sum(0).numpy(), rtol=2e-5)
        assert (f"blk.{block}.ffn_down_shexp.weight" in ours) == shared


def test_dense_first_layers_stay_dense() -> None:
    ours = run_collector(tiny_moe("deepseek_v3"), batches_for(tiny_moe("deepseek_v3"), n=1))
    assert ours["blk.0.ffn_down.weight"].n_mat == 1 and "blk.0.ffn_down_exps.weight" not in ours
    assert ours["blk.1.ffn_down_exps.weight"].n_mat == 8


def test_experts_implementation_setting_does_not_matter() -> None:
    loaded = tiny_moe("qwen3moe")
    batches = batches_for(loaded, n=1)
    grouped = run_collector(loaded, batches)
    loaded.model.config._experts_implementation = "eager"
    eager = run_collector(loaded, batches)
    for name in grouped:
        np.testing.assert_allclose(eager[name].sums, grouped[name].sums, rtol=1e-5)
        assert eager[name].counts.tolist() == grouped[name].counts.tolist()


class ListedExperts(torch.nn.ModuleList):
    """Per-expert `nn.Linear` MLPs (old Mixtral layout: w1 gate, w3 up, w2 down), same maths as the fused one."""

    def __init__(self, fused: torch.nn.Module) -> None:
        n_expert, n_embd, n_ff = fused.down_proj.shape
        super().__init__()
        for expert in range(n_expert):
            mlp = torch.nn.Module()
            gate_up = fused.gate_up_proj[expert]
            for attribute, weight in (("w1", gate_up[:n_ff]), ("w3", gate_up[n_ff:]), ("w2", fused.down_proj[expert])):
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight.data.copy_(weight)
                setattr(mlp, attribute, linear)
            self.append(mlp)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for index, mlp in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if token.numel():
                rows = hidden[token]
                y = mlp.w2(torch.nn.functional.silu(mlp.w1(rows)) * mlp.w3(rows))
                out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


def test_per_expert_linear_layout_matches_fused() -> None:
    fused = tiny_moe("mixtral")
    listed = tiny_moe("mixtral")
    for layer in listed.model.model.layers:
        layer.mlp.experts = ListedExperts(layer.mlp.experts)
    targets = collection_targets(listed, False)
    assert isinstance(targets["blk.0.ffn_up_exps.weight"], ExpertTarget)
    batches = batches_for(fused, n=1)
    expected, ours = run_collector(fused, batches), run_collector(listed, batches)
    assert ours.names() == expected.names()
    for name in expected:
        assert ours[name].counts.tolist() == expected[name].counts.tolist(), name
        np.testing.assert_allclose(ours[name].sums, expected[name].sums, rtol=1e-4, atol=1e-6)


def test_idle_experts_are_reported(tmp_path: Path) -> None:
    loaded = tiny_moe("qwen3moe")
    matrix = run_collector(loaded, [torch.tensor([[5]])])  # one token: 2 of 8 experts get data
    counts = expert_token_counts(matrix)
    assert sorted(counts) == ["blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight"]
    assert all(sorted(c.tolist()) == [0] * 6 + [1, 1] for c in counts.values())
    warnings = partial_data_warnings(matrix)
    assert f"save_imatrix: entry '{'blk.0.ffn_up_exps.weight':>40}' has partial data (25.00%)" in warnings
    assert len(warnings) == 6
    assert "6 of 8 experts without data" in expert_count_lines(matrix)[0]
    assert np.all(matrix["blk.1.ffn_gate_exps.weight"].mean_sq()[counts["blk.1.ffn_down_exps.weight"] == 0] == 0)
    matrix.chunk_size = 1
    reported: list[str] = []
    save_imatrix(matrix, tmp_path / "partial.gguf", reporter=Reporter(verbosity=0, messages=reported.append))
    assert reported == warnings  # at every verbosity, as before


def write_moe_gguf(path: Path, loaded: LoadedModel) -> Path:
    """The model as llama.cpp's converter writes it: expert stacks split out of `gate_up_proj`, q/k
    rows permuted for llama (Mixtral), the shared-expert gate as a vector."""
    config, architecture = loaded.config, loaded.architecture
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[architecture.gguf_arch])
    write_metadata(writer, config)
    writer.add_key_length(config.hidden_size // config.num_attention_heads)
    writer.add_expert_count(getattr(config, "num_experts", None) or config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if hasattr(config, "moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if hasattr(config, "shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    state = {name: tensor.detach().numpy() for name, tensor in loaded.model.state_dict().items()}
    for param, (name,) in loaded.gguf_names.items():
        values = state[param]
        if architecture.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            values = permute_rows(values, config.num_attention_heads if "attn_q" in name
                                  else config.num_key_value_heads)
        writer.add_tensor(name, values.reshape(-1) if name.endswith("gate_inp_shexp.weight") else values)
    for param, names in expert_stack_map(loaded.model, architecture, N_LAYERS).items():
        for name, stack in zip(names, np.split(state[param], len(names), axis=1), strict=True):
            writer.add_tensor(name, np.ascontiguousarray(stack))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["mixtral", "qwen2moe", "qwen3moe"])
def test_gguf_round_trip_collects_the_same(case: str, tmp_path: Path) -> None:
    """Config from GGUF metadata (routing, expert sizes, shared experts) and weights from the stacks."""
    original = tiny_moe(case)
    from_gguf = load_model(write_moe_gguf(tmp_path / f"{case}.gguf", original))
    assert type(from_gguf.model) is type(original.model)
    batches = batches_for(original, n=1)
    expected, ours = run_collector(original, batches), run_collector(from_gguf, batches)
    assert ours.names() == expected.names()
    for name in expected:
        assert ours[name].counts.tolist() == expected[name].counts.tolist(), name
        np.testing.assert_allclose(ours[name].sums, expected[name].sums, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_hf_checkpoint_directory(case: str, tmp_path: Path) -> None:
    """`save_pretrained` writes per-expert tensors; transformers fuses them again on loading."""
    original = tiny_moe(case)
    original.model.save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=_hf_tokenizer(), bos_token=BOS).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.architecture is original.architecture
    batches = batches_for(original, n=1)
    expected, ours = run_collector(original, batches), run_collector(loaded, batches)
    assert ours.names() == expected.names()
    for name in expected:
        assert ours[name].counts.tolist() == expected[name].counts.tolist(), name
        np.testing.assert_allclose(ours[name].sums, expected[name].sums, rtol=1e-5, atol=1e-6, err_msg=name)


# --- against llama-imatrix on the tiny Qwen3-MoE GGUF (golden/moe) ---

@pytest.fixture(scope="module")
def moe_gguf(golden: Path) -> Path:
    return golden / "moe" / "tiny-qwen3moe-f16.gguf"


@pytest.fixture(scope="module")
def moe_model(moe_gguf: Path) -> LoadedModel:
    return load_model(moe_gguf, round_to_f16=True)  # the F16 weights llama.cpp ran, exactly


def test_gguf_config_and_experts(moe_model: LoadedModel, moe_gguf: Path) -> None:
    config = moe_model.config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 128)
    assert config.norm_topk_prob  # llama.cpp's qwen3moe graph normalises the top-k weights
    experts = moe_model.model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (8, 256, 256)
    model_file = GGUFModelFile(moe_gguf)
    gate_up, down = experts.gate_up_proj.detach().numpy(), experts.down_proj.detach().numpy()
    np.testing.assert_array_equal(gate_up[:, :128], model_file.tensor_f32("blk.0.ffn_gate_exps.weight"))
    np.testing.assert_array_equal(gate_up[:, 128:], model_file.tensor_f32("blk.0.ffn_up_exps.weight"))
    np.testing.assert_array_equal(down, model_file.tensor_f32("blk.0.ffn_down_exps.weight"))
    assert moe_model.expert_stacks["model.layers.2.mlp.experts.gate_up_proj"] == (
        "blk.2.ffn_gate_exps.weight", "blk.2.ffn_up_exps.weight")


def test_matches_llama_imatrix(moe_model: LoadedModel, golden: Path) -> None:
    text = golden.parent / "data" / "calibration.txt"
    result = collect(CollectOptions(model=moe_model, file=text, ctx_size=256, chunks=8))
    ours, theirs = result.matrix, load_imatrix(golden / "moe" / "tiny-qwen3moe.c256.n8.imatrix.gguf")
    golden_ppl = float((golden / "moe" / "tiny-qwen3moe.c256.n8.ppl.txt").read_text().split("PPL = ")[1].split()[0])
    assert abs(result.ppl.ppl / golden_ppl - 1) <= 3e-3
    assert ours.names() == theirs.names()
    cosines, rel_l2 = [], []
    for name in theirs:
        assert ours[name].sums.shape == theirs[name].sums.shape, name
        a, b = ours[name].counts, theirs[name].counts
        if theirs[name].n_mat > 1:
            assert a.sum() == b.sum() == 2048 * 2
            assert np.abs(a - b).max() <= 0.02 * b.max(), name
            continue
        assert a.tolist() == b.tolist()
        x, y = ours[name].mean_sq().ravel().astype(np.float64), theirs[name].mean_sq().ravel().astype(np.float64)
        cosines.append(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
        rel_l2.append(np.linalg.norm(x - y) / np.linalg.norm(y))
    assert min(cosines) >= 0.999
    assert np.median(rel_l2) <= 1e-3
    for name in theirs:  # expert stacks: routing near-ties flip a few tokens between experts
        x, y = ours[name].mean_sq().ravel().astype(np.float64), theirs[name].mean_sq().ravel().astype(np.float64)
        assert x @ y / np.linalg.norm(x) / np.linalg.norm(y) >= 0.999, name


def test_cli_on_moe_gguf(moe_gguf: Path, golden: Path, tmp_path: Path) -> None:
    out = tmp_path / "moe.imatrix.gguf"
    text = golden.parent / "data" / "calibration.txt"
    assert main(["-m", str(moe_gguf), "-f", str(text), "-c", "256", "--chunks", "2", "--no-ppl", "-o", str(out)]) == 0
    saved = load_imatrix(out)
    theirs = load_imatrix(golden / "moe" / "tiny-qwen3moe.c256.n8.imatrix.gguf")
    assert saved.names() == theirs.names()
    assert (saved.chunk_count, saved.chunk_size) == (2, 256)
    for name in theirs:
        assert saved[name].sums.shape == theirs[name].sums.shape
        assert saved[name].counts.sum() == 512 * (2 if "_exps" in name else 1)


def test_in_file_with_other_expert_count_fails_before_collecting(moe_model: LoadedModel, golden: Path,
                                                                 tmp_path: Path) -> None:
    from imatrix import ImatrixError
    from imatrix.matrix import TensorStats

    base = load_imatrix(golden / "moe" / "tiny-qwen3moe.c256.n8.imatrix.gguf")
    stack = base["blk.1.ffn_up_exps.weight"]
    base.tensors["blk.1.ffn_up_exps.weight"] = TensorStats(stack.sums[:4], stack.counts[:4])
    save_imatrix(base, tmp_path / "four-experts.gguf")

    def no_chunk_expected(line: str) -> None:
        raise AssertionError(f"collection started: {line}")

    with pytest.raises(ImatrixError, match="'blk.1.ffn_up_exps.weight' has 4 experts there, 8 experts in the model"):
        collect(CollectOptions(model=moe_model, file=golden.parent / "data" / "calibration.txt", ctx_size=256,
                               chunks=1, in_file=[tmp_path / "four-experts.gguf"]),
                Reporter(output=no_chunk_expected))


def test_in_file_from_a_legacy_dat_continues_on_a_moe_model(moe_model: LoadedModel, golden: Path,
                                                            moe_dat: Path) -> None:
    """A .dat flattens each expert stack to one row: llama.cpp merges it into the experts, so do we."""
    base = load_imatrix(moe_dat, chunk_size=256)
    result = collect(CollectOptions(model=moe_model, file=golden.parent / "data" / "calibration.txt", ctx_size=256,
                                    chunks=1, ppl=False, in_file=[moe_dat]))
    stack = result.matrix["blk.1.ffn_up_exps.weight"]
    assert stack.n_mat == 8 and stack.counts.sum() == 8 * base["blk.1.ffn_up_exps.weight"].counts[0] + 256 * 2
