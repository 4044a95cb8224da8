"""`imatrix.perplexity` (`imatrix.eval`): perplexity and KL divergence scored like llama-perplexity.

Fast tests use tiny random llama models and a character tokenizer; the slow one checks the real
SmolLM2 F16 against llama-perplexity's figure in the golden quality.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from imatrix import PerplexityOptions, Reporter, perplexity
from imatrix.cli.main import main
from imatrix.errors import ImatrixError
from imatrix.eval.cpu_matmul import activation_rounding, emulate_cpu_matmul_inputs, q8_0_values, q8_k_values
from imatrix.eval.kld import kld_summary
from imatrix.eval.logits_file import HEADER_BYTES, LogitsFile, row_width
from imatrix.eval.perplexity import PerplexityResult
from imatrix.formats import load_imatrix
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.metrics import KLDResult, log_softmax_u16, u16_log_probs
from imatrix.models.architectures import ALL
from imatrix.models.loader import LoadedModel, load_model

T = gguf.GGMLQuantizationType
VOCAB = 101  # odd, so the base file rows carry a padding value
N_CTX = 32


@dataclass
class CharTokenizer:
    bos_id: int | None = 0
    add_bos: bool = True

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        ids = [1 + ord(char) % (VOCAB - 1) for char in text]
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids


def tiny_model(seed: int, add_bos: bool = True) -> LoadedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)  # peaked enough that the softmax is far from uniform
    model.eval()
    llama = next(arch for arch in ALL if arch.model_class == "LlamaForCausalLM")
    return LoadedModel(model, CharTokenizer(add_bos=add_bos), llama, {}, Path("tiny"))


def ppl(model: LoadedModel | Path, text: Path, output: Callable[[str], None] | None = None,
        **options: object) -> PerplexityResult:
    return perplexity(PerplexityOptions(model=model, file=text, **options), Reporter(output=output))


def kld(model: LoadedModel | Path, base: Path, output: Callable[[str], None] | None = None,
        **options: object) -> KLDResult:
    return perplexity(PerplexityOptions(model=model, kl_divergence_base=base, kl_divergence=True, **options),
                      Reporter(output=output))


def perturbed(loaded: LoadedModel, seed: int, amount: float = 0.05) -> LoadedModel:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(amount * torch.randn_like(param))
    model.eval()
    return LoadedModel(model, loaded.tokenizer, loaded.architecture, {}, Path("tiny-perturbed"))


@pytest.fixture(scope="module")
def model_a() -> LoadedModel:
    return tiny_model(0)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "slept", "quietly", "\n"]
    path.write_text(" ".join(rng.choice(words, size=60)) + "\n")
    return path


def exact_log_probs(loaded: LoadedModel, text: Path, n_ctx: int = N_CTX) -> tuple[torch.Tensor, torch.Tensor]:
    """Independently: (log-probs float64 [n_chunk, n_scored, vocab], targets [n_chunk, n_scored])."""
    tokens = loaded.tokenizer.encode(text.read_text()[:-1])
    n_chunk = len(tokens) // n_ctx
    chunks = torch.tensor(tokens[: n_chunk * n_ctx]).view(n_chunk, n_ctx)
    inputs = chunks.clone()
    inputs[:, 0] = loaded.tokenizer.bos_id
    with torch.no_grad():
        logits = loaded.model(input_ids=inputs).logits.double()
    first = n_ctx // 2
    return torch.log_softmax(logits[:, first:-1], dim=-1), chunks[:, first + 1 :]


def test_ppl_is_exp_of_the_mean_nll(model_a: LoadedModel, text: Path) -> None:
    log_probs, targets = exact_log_probs(model_a, text)
    nll = -log_probs.gather(2, targets.unsqueeze(-1)).squeeze(-1)
    printed: list[str] = []
    result = ppl(model_a, text, ctx_size=N_CTX, output=printed.append)
    assert result.n_tokens == nll.numel() == targets.shape[0] * (N_CTX // 2 - 1)
    assert result.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    running = [math.exp(nll[: i + 1].mean()) for i in range(nll.shape[0])]
    np.testing.assert_allclose(result.chunk_ppl, running, rtol=1e-5)
    flat = nll.ravel()
    error = math.sqrt(((flat**2).mean() - flat.mean() ** 2) / (flat.numel() - 1)) * math.exp(flat.mean())
    assert result.ppl_error == pytest.approx(error, rel=1e-4)
    out = "".join(printed)
    assert re.fullmatch(r"(\[\d+\]\d+\.\d{4},)+\nFinal estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}\n", out), out


def test_max_chunks_and_batch_size(model_a: LoadedModel, text: Path) -> None:
    one_by_one = ppl(model_a, text, ctx_size=N_CTX, batch_size=N_CTX)
    batched = ppl(model_a, text, ctx_size=N_CTX, batch_size=4 * N_CTX)
    np.testing.assert_allclose(one_by_one.chunk_ppl, batched.chunk_ppl, rtol=1e-5)
    two = ppl(model_a, text, ctx_size=N_CTX, chunks=2)
    assert len(two.chunk_ppl) == 2 and two.chunk_ppl == pytest.approx(batched.chunk_ppl[:2], rel=1e-5)


def test_text_too_short(model_a: LoadedModel, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few characters")
    with pytest.raises(ImatrixError, match="short.txt.*at least 64"):
        ppl(model_a, short, ctx_size=N_CTX)
    with pytest.raises(ImatrixError, match="short.txt: --chunks 0"):
        ppl(model_a, short, ctx_size=N_CTX, chunks=0)


def test_kld_of_a_model_against_itself(model_a: LoadedModel, text: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.kld"
    itself = ppl(model_a, text, ctx_size=N_CTX, kl_divergence_base=base)
    result = kld(model_a, base)
    assert result.count == itself.n_tokens
    assert abs(result.mean_kld) < 1e-6 and np.abs(result.kld_values).max() < 1e-4
    assert result.same_top_percent == 100.0
    assert result.ppl == pytest.approx(itself.ppl, rel=1e-6)
    assert result.ppl_base == pytest.approx(itself.ppl, rel=1e-4)
    assert abs(result.log_ppl_ratio()[0]) < 1e-4


def test_kld_against_another_model_matches_the_exact_value(model_a: LoadedModel, text: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.kld"
    ppl(model_a, text, ctx_size=N_CTX, kl_divergence_base=base)
    model_b = perturbed(model_a, seed=5)
    printed: list[str] = []
    result = kld(model_b, base, batch_size=N_CTX, output=printed.append)
    log_p, targets = exact_log_probs(model_a, text)
    log_q, _ = exact_log_probs(model_b, text)
    exact_kld = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert 1e-3 < result.mean_kld == pytest.approx(float(exact_kld.mean()), rel=1e-3, abs=1e-5)
    np.testing.assert_allclose(result.kld_values, exact_kld.ravel().numpy(), atol=1e-3)
    same = (log_p.argmax(-1) == log_q.argmax(-1)).sum()
    assert abs(result.n_same_top - int(same)) <= 1
    nll_q = -log_q.gather(2, targets.unsqueeze(-1)).squeeze(-1)
    assert result.ppl == pytest.approx(math.exp(nll_q.mean()), rel=1e-5)
    out = "".join(printed)
    assert "ln(PPL(Q)/PPL(base))" in out and out.count(" %\n") >= targets.shape[0]


def test_summary_block_like_llama_cpp(model_a: LoadedModel, text: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.kld"
    ppl(model_a, text, ctx_size=N_CTX, kl_divergence_base=base)
    printed: list[str] = []
    result = kld(perturbed(model_a, seed=6), base, output=printed.append)
    summary = "".join(printed)
    assert result.count >= 100
    for label in ("Mean PPL(Q)", "Mean PPL(base)", "Mean ln(PPL(Q)/PPL(base))", "Mean    KLD:", "Maximum KLD:",
                  "99.9%   KLD:", "Median  KLD:", "Minimum KLD:", "Mean    Δp:", "RMS Δp    :", "Same top p:"):
        assert label in summary, label
    top = float(re.search(r"Same top p: +([0-9.]+) ±", summary).group(1))
    assert top == pytest.approx(result.same_top_percent, abs=1e-3)
    mean_kld = float(re.search(r"Mean    KLD: +([0-9.]+) ±", summary).group(1))
    assert mean_kld == pytest.approx(result.mean_kld, abs=1e-6)


def test_base_file_layout(model_a: LoadedModel, text: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.kld"
    ppl(model_a, text, ctx_size=N_CTX, kl_divergence_base=base)
    raw = base.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype="<i4")
    assert (n_ctx, n_vocab) == (N_CTX, VOCAB)
    tokens = model_a.tokenizer.encode(text.read_text()[:-1])
    assert n_chunk == len(tokens) // N_CTX
    # tokens as tokenized: only the first chunk starts with BOS
    assert np.frombuffer(raw[20 : 20 + 4 * n_chunk * n_ctx], dtype="<i4").tolist() == tokens[: n_chunk * n_ctx]
    width = row_width(VOCAB)
    assert width == VOCAB + 1 + 4
    assert len(raw) == 20 + 4 * n_chunk * n_ctx + n_chunk * (n_ctx - 1 - n_ctx // 2) * width * 2
    rows = LogitsFile(base).chunk_rows(0)
    assert (rows[:, -1] == 0).all()  # the padding value


def llama_cpp_row(logits: np.ndarray) -> np.ndarray:
    """One row the way llama.cpp's scalar loop fills it, in float32."""
    f32 = np.float32
    max_logit, min_logit = logits.max(), max(logits.min(), logits.max() - f32(16))
    log_sum_exp = f32(np.log(np.sum(np.exp(logits - max_logit).astype(np.float64))))
    scale = f32((max_logit - min_logit) / f32(65535))
    inv_scale = f32(1) / scale
    row = np.zeros(row_width(logits.size), dtype=np.uint16)
    row[:4] = np.array([scale, f32(min_logit - max_logit) - log_sum_exp], dtype=np.float32).view(np.uint16)
    for i, value in enumerate(logits):
        row[4 + i] = int(np.rint(inv_scale * (value - min_logit))) if value > min_logit else 0
    return row


def test_quantized_rows_match_llama_cpps_arithmetic() -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, VOCAB)) * np.array([[0.5], [3], [8], [20]])).astype(np.float32)
    rows, nll = log_softmax_u16(torch.from_numpy(logits), torch.tensor([0, 1, 2, 3]))
    expected = np.stack([llama_cpp_row(row) for row in logits])
    assert (rows.astype(np.int64) - expected.astype(np.int64)).__abs__().max() <= 1
    assert (rows[:, :4] == expected[:, :4]).all()
    exact = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    decoded = u16_log_probs(rows, VOCAB).double()
    kept = exact > exact.max(dim=1, keepdim=True).values - 16
    step = torch.from_numpy(rows[:, :4].copy().view(np.float32))[:, :1].double()
    assert ((decoded - exact).abs() <= step * 0.51 + 1e-5)[kept].all()
    np.testing.assert_allclose(nll.numpy(), -exact[torch.arange(4), torch.arange(4)].numpy(), rtol=1e-5)


def test_truncated_or_foreign_base_file(model_a: LoadedModel, text: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.kld"
    ppl(model_a, text, ctx_size=N_CTX, kl_divergence_base=base)
    cut = tmp_path / "cut.kld"
    cut.write_bytes(base.read_bytes()[:-10])
    with pytest.raises(ImatrixError, match=r"cut\.kld: truncated"):
        kld(model_a, cut)
    foreign = tmp_path / "foreign.kld"
    foreign.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ImatrixError, match=r"foreign\.kld: not a file of base log-probabilities"):
        kld(model_a, foreign)
    with pytest.raises(ImatrixError, match="absent.kld: no such"):
        kld(model_a, tmp_path / "absent.kld")


def test_vocab_mismatch(model_a: LoadedModel, text: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.kld"
    ppl(model_a, text, ctx_size=N_CTX, kl_divergence_base=base)
    raw = bytearray(base.read_bytes())
    raw[12:16] = np.array([VOCAB + 1], dtype="<i4").tobytes()
    other = tmp_path / "other.kld"
    other.write_bytes(bytes(raw))
    with pytest.raises(ImatrixError, match="other.kld"):
        kld(model_a, other)


def test_base_tokens_outside_the_vocabulary(model_a: LoadedModel, text: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.kld"
    ppl(model_a, text, ctx_size=N_CTX, kl_divergence_base=base)
    for token in (VOCAB, -5):
        raw = bytearray(base.read_bytes())
        raw[HEADER_BYTES + 4 * 7 : HEADER_BYTES + 4 * 8] = np.array([token], dtype="<i4").tobytes()
        bad = tmp_path / "bad.kld"
        bad.write_bytes(bytes(raw))
        with pytest.raises(ImatrixError, match=rf"bad\.kld: token id {token} at position 7 is outside the vocabulary"):
            kld(model_a, bad)


def test_base_file_never_replaces_the_text_or_model(text: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine.txt"
    mine.write_bytes(text.read_bytes())
    assert main(["perplexity", "-f", str(mine), "-c", "64", "--chunks", "1", "--kl-divergence-base", str(mine)]) == 1
    assert "also the text" in capsys.readouterr().err
    assert mine.read_bytes() == text.read_bytes()


def test_failed_run_leaves_no_base_file(model_a: LoadedModel, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("x" * 10)
    with pytest.raises(ImatrixError):
        ppl(model_a, short, ctx_size=N_CTX, kl_divergence_base=tmp_path / "base.kld")
    assert not (tmp_path / "base.kld").exists()


def test_statistics_helpers_on_an_empty_result() -> None:
    empty = KLDResult()
    assert kld_summary(empty) == "" and empty.kld() == (0.0, 0.0)


@pytest.mark.parametrize(("argv", "fragment"), [
    (["perplexity", "--kl-divergence"], "--kl-divergence needs --kl-divergence-base"),
    (["perplexity", "-c", "512"], "needs a text: -f FILE"),
    (["perplexity", "-f", "/nonexistent/x.txt"], "/nonexistent/x.txt: no such text file"),
    (["perplexity", "--kl-divergence", "--kl-divergence-base", "/nonexistent/b.kld"], "/nonexistent/b.kld: no such"),
    (["perplexity", "-c", "0", "-f", "x"], "--ctx-size must be > 3"),
    (["perplexity", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imatrix: error: ") and fragment in err[0], err


@pytest.mark.slow
def test_smollm2_f16_matches_llama_perplexity(smollm2_q4_1: Path, eval_text: Path, golden: Path) -> None:
    quality = (golden / "quant" / "quality.md").read_text()
    expected = float(re.search(r"F16: PPL = ([0-9.]+) \+/- ([0-9.]+)", quality).group(1))
    loaded = load_model(smollm2_q4_1, round_to_f16=True)
    printed: list[str] = []
    result = ppl(loaded, eval_text, ctx_size=512, chunks=10, output=printed.append)
    assert abs(result.ppl / expected - 1) <= 3e-3, (result.ppl, expected)
    assert re.findall(r"\[(\d+)\]", "".join(printed)) == [str(i) for i in range(1, 11)]


@pytest.mark.slow
def test_cli_base_then_kld_on_smollm2(capsys: pytest.CaptureFixture[str], eval_text: Path, tmp_path: Path) -> None:
    base = tmp_path / "f16.kld"
    common = ["perplexity", "-c", "128", "--chunks", "3"]
    assert main([*common, "-f", str(eval_text), "--round-to-f16", "--kl-divergence-base", str(base)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[3\][0-9.]+,\nFinal estimate: PPL = [0-9.]+ \+/- [0-9.]+", out), out
    assert main([*common, "--kl-divergence-base", str(base), "--kl-divergence"]) == 0  # Q4_1 against F16
    out = capsys.readouterr().out
    kld = float(re.search(r"Mean    KLD: +([0-9.]+)", out).group(1))
    top = float(re.search(r"Same top p: +([0-9.]+)", out).group(1))
    assert 0 < kld < 0.05 and top > 90


# --- llama.cpp's CPU matmul inputs (imatrix.eval.cpu_matmul) ---


def test_q8_0_activations_match_gguf_round_trip() -> None:
    x = torch.randn(7, 3 * 32, generator=torch.Generator().manual_seed(0)) * 3
    x[2, :32] = 0  # an all-zero block stays zero
    expected = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), T.Q8_0), T.Q8_0)
    np.testing.assert_array_equal(q8_0_values(x).numpy(), expected)


def test_q8_k_activations_are_256_blocks_of_127_levels() -> None:
    x = torch.randn(5, 2 * 256, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 2
    x[1, 256:] = 0
    rounded = q8_k_values(x)
    for block, values in zip(x.reshape(-1, 256), rounded.reshape(-1, 256), strict=True):
        extreme = block[block.abs().argmax()]
        if extreme == 0:
            assert torch.all(values == 0)
            continue
        scale = 1 / (-127 / extreme)
        levels = values / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127 + 1e-4
        assert abs(float(levels[block.abs().argmax()]) + 127) < 1e-4  # the extreme is level -127
        assert float((values - block).abs().max()) <= abs(float(scale)) * 0.5 * (1 + 1e-5)


def test_emulation_rounds_each_matmul_input_for_its_weight_type(golden: Path, tmp_path: Path) -> None:
    from imatrix.quant.model import quantize_model

    quantized = tmp_path / "moe-q4_k_m.gguf"
    quantize_model(golden / "moe" / "tiny-qwen3moe-f16.gguf", quantized, "Q4_K_M", n_threads=1)
    loaded = load_model(quantized)
    types = {name: info.tensor_type for name, info in GGUFModelFile(quantized).tensors.items()}
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    seen: dict[str, torch.Tensor] = {}
    # pre-hooks run in registration order: one before the emulation's, one after it
    q_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("before", args[0].clone()))
    handles = emulate_cpu_matmul_inputs(loaded)
    q_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("after", args[0].clone()))
    assert types["blk.0.attn_q.weight"] == T.Q4_K  # 256 columns: a real K-quant, Q8_K inputs
    n_dense = sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    assert len(handles) == n_dense
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    before, after = seen["before"], seen["after"]
    assert not torch.equal(before, after)
    assert torch.equal(after, q8_k_values(before))
    for handle in handles:
        handle.remove()
    assert activation_rounding(T.Q4_0, 576) is q8_0_values and activation_rounding(T.Q4_K, 576) is None
    assert activation_rounding(T.F32, 576) is None


@pytest.mark.slow
def test_our_q2_k_scores_like_llama_cpps_own_under_cpu_emulation(
    smollm2_q4_1: Path, eval_text: Path, golden: Path, tmp_path: Path
) -> None:
    """Our imatrix Q2_K of SmolLM2, scored with llama.cpp's CPU matmul inputs, within 1% of the PPL
    llama-perplexity gives llama-quantize's Q2_K (golden quality.md)."""
    from imatrix.models.f16 import write_f16_model
    from imatrix.quant.model import quantize_model

    quality = (golden / "quant" / "quality.md").read_text()
    expected = float(re.search(r"\| Q2_K \| yes \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|", quality).group(1))
    f16 = write_f16_model(smollm2_q4_1, tmp_path / "f16.gguf")
    quantized = tmp_path / "q2_k.gguf"
    imatrix = load_imatrix(golden / "imatrix" / "smollm2-f16.c512.n40.imatrix.gguf")
    quantize_model(f16, quantized, "Q2_K", imatrix, n_threads=2)
    loaded = load_model(quantized)
    emulate_cpu_matmul_inputs(loaded)
    result = ppl(loaded, eval_text, ctx_size=512, chunks=10)
    assert abs(result.ppl / expected - 1) <= 0.01, (result.ppl, expected)
