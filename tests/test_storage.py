"""Memory of the in-memory path: 16-bit weights stay 16-bit and are widened per call (same numbers as
float32 storage); on CPU at most two sequences go through the model at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models import storage
from imatrix.models.loader import load_model
from imatrix.models.open import open_model
from imatrix.models.storage import WideningEmbedding, WideningLinear
from imatrix.pipeline import sequential
from imatrix.pipeline.executors import CPU_SEQS_PER_FORWARD, InMemoryExecutor, forward_in_memory
from imatrix.quant.model import quantize_model
from tiny_models import tiny_llama_config, write_tiny_llama_gguf

FILE_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (torch.bfloat16, torch.bfloat16)}


def widened_to_float32(model: torch.nn.Module) -> None:
    """Undo the narrow storage in place: float32 weights and plain Linear/Embedding modules."""
    for module in model.modules():
        if isinstance(module, WideningLinear):
            if module.file_order_head_rows:
                module.weight.data = storage.checkpoint_row_order(module.weight.data, module.file_order_head_rows)
            module.__class__ = torch.nn.Linear
        elif isinstance(module, WideningEmbedding):
            module.__class__ = torch.nn.Embedding
    for param in model.parameters():
        param.data = param.data.float()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("file_type", list(FILE_DTYPES))
def test_16_bit_weights_kept_narrow_and_logits_unchanged(tmp_path: Path, file_type: str, tied: bool) -> None:
    file_dtype, kept_as = FILE_DTYPES[file_type]
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tiny_llama_config(tied=tied), dtype=file_dtype)
    model = load_model(path).model
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj) is WideningLinear and layer.self_attn.q_proj.weight.dtype == kept_as
    assert type(model.model.embed_tokens) is WideningEmbedding and model.model.embed_tokens.weight.dtype == kept_as
    assert layer.input_layernorm.weight.dtype == torch.float32  # norms are F32 in the file
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        narrow = model(input_ids=ids).logits
        assert narrow.dtype == torch.float32
        widened_to_float32(model)
        reference = model(input_ids=ids).logits
    # widening is exact; q/k/v and gate/up joined in one wider matmul (`SharedInputLinears`) are the same
    # bits with MKL's AVX-512 sgemm, within the rounding of other kernels (AVX2: 4e-6 seen); weights widened
    # through bfloat16 move these logits by 5e-3, rows out of order by ~3
    torch.testing.assert_close(narrow, reference, rtol=1e-4, atol=2e-4)


def test_float32_file_and_bfloat16_compute_keep_their_dtype(tmp_path: Path) -> None:
    f32_path = write_tiny_llama_gguf(tmp_path / "f32.gguf")
    f32_model = load_model(f32_path).model
    assert type(f32_model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert {param.dtype for param in f32_model.parameters()} == {torch.float32}
    f16_path = write_tiny_llama_gguf(tmp_path / "f16.gguf", dtype=np.float16)
    bf16_model = load_model(f16_path, dtype=torch.bfloat16).model
    assert type(bf16_model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert {param.dtype for param in bf16_model.parameters()} == {torch.bfloat16}


def test_round_to_f16_keeps_a_quantized_model_as_float16(tmp_path: Path) -> None:
    q8_0 = quantize_model(write_tiny_llama_gguf(tmp_path / "f32.gguf"), tmp_path / "q8_0.gguf", "Q8_0", pure=True)
    rounded = load_model(q8_0.output_path, round_to_f16=True).model.model.layers[0].mlp.down_proj.weight
    dequantized = load_model(q8_0.output_path).model.model.layers[0].mlp.down_proj.weight
    assert rounded.dtype == torch.float16 and dequantized.dtype == torch.float32
    assert torch.equal(rounded, dequantized.half())


def test_weight_bytes_counts_16_bit_matrices_at_2_bytes(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "f16.gguf", dtype=np.float16)
    model = load_model(path).model
    in_memory = sum(param.numel() * param.element_size() for param in model.parameters())
    assert sequential.weight_bytes(open_model(path), torch.float32) == in_memory
    matrices = sum(param.numel() for param in model.parameters() if param.dim() == 2)
    vectors = sum(param.numel() for param in model.parameters() if param.dim() == 1)
    assert in_memory == 2 * matrices + 4 * vectors


def test_large_weights_widened_by_blocks_of_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tied.gguf", tiny_llama_config(tied=True), dtype=np.float16)
    model = load_model(path).model
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(input_ids=ids).logits
        monkeypatch.setattr(storage, "WIDEN_WHOLE_MAX_VALUES", 3 * model.config.hidden_size)  # 3 rows a block
        by_blocks = model(input_ids=ids).logits
    torch.testing.assert_close(by_blocks, whole, rtol=1e-4, atol=1e-4)  # other matmul kernels: rounding only


def test_cpu_executor_runs_two_sequences_at_a_time_with_the_same_result(tmp_path: Path) -> None:
    loaded = load_model(write_tiny_llama_gguf(tmp_path / "f16.gguf", dtype=np.float16))
    batch = torch.randint(0, loaded.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    forward_batches = []
    hook = loaded.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: forward_batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    with torch.inference_mode():
        (split,) = InMemoryExecutor(loaded).hidden_states([batch])
        hook.remove()
        together = forward_in_memory(loaded, batch)
    assert forward_batches == [CPU_SEQS_PER_FORWARD, 3 - CPU_SEQS_PER_FORWARD] == [2, 1]
    assert split.shape == together.shape == (3, 16, loaded.config.hidden_size)
    torch.testing.assert_close(split, together, rtol=1e-5, atol=1e-5)


def _file_mapping(path: Path) -> tuple[list[tuple[int, int]], int]:
    """Address ranges of this process's mappings of `path`, and their resident kB (/proc/self/smaps)."""
    ranges, resident, current = [], 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            current = len(fields) >= 6 and fields[-1] == str(path)
            if current:
                start, stop = (int(part, 16) for part in fields[0].split("-"))
                ranges.append((start, stop))
        elif current and fields[0] == "Rss:":
            resident += int(fields[1])
    return ranges, resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_16_bit_weights_read_in_place_from_the_file_and_their_pages_given_back(tmp_path: Path) -> None:
    config = tiny_llama_config(hidden=256, heads=4, kv_heads=2, intermediate=1024, tied=True)
    path = write_tiny_llama_gguf(tmp_path / "f16.gguf", config, dtype=np.float16).resolve()
    model = load_model(path).model
    ranges, _ = _file_mapping(path)
    up = model.model.layers[0].mlp.up_proj.weight
    assert any(start <= up.data_ptr() < stop for start, stop in ranges)  # the file's bytes, not a copy
    q = model.model.layers[0].self_attn.q_proj.weight
    assert any(start <= q.data_ptr() < stop for start, stop in ranges)  # rows reordered when widened
    ids = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        _, released = _file_mapping(path)
        for module in model.modules():
            if isinstance(module, WideningLinear | WideningEmbedding):
                module.release_pages = None
        assert torch.equal(model(input_ids=ids).logits, logits)
        _, kept = _file_mapping(path)
    matrices_kb = sum(p.numel() * 2 for p in model.parameters() if p.dim() == 2) // 1024
    assert kept - released > matrices_kb // 2  # without release the weights stay resident
    assert released < matrices_kb // 4


def test_widening_reuses_one_buffer_only_without_autograd() -> None:
    first, second = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    reference = torch.nn.Sequential(first, second)
    narrow = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    for module, source in zip(narrow, reference, strict=True):
        source.weight.data = source.weight.data.half().float()
        module.weight = torch.nn.Parameter(source.weight.data.half(), requires_grad=False)
        source.weight.requires_grad_(False)
    storage.widen_narrow_modules(narrow, torch.float32)
    x = torch.randn(4, 8, requires_grad=True)
    narrow(x).sum().backward()  # both layers' weights share a shape: the first must not be overwritten
    expected = x.detach().clone().requires_grad_(True)
    reference(expected).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, rtol=0, atol=0)
    with torch.inference_mode():
        assert storage.widened(narrow[0].weight, torch.float32) is storage.widened(narrow[1].weight, torch.float32)


def test_llama_qk_rows_kept_in_file_order_widen_to_the_checkpoint_rows(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_llama_config(hidden=64, heads=4, kv_heads=2, intermediate=128)
    path = write_tiny_llama_gguf(tmp_path / "f16.gguf", config, dtype=np.float16)
    loaded = load_model(path)
    model_file = GGUFModelFile(path)
    attention = loaded.model.model.layers[1].self_attn
    checkpoint = {}
    for module, name, n_head in ((attention.q_proj, "blk.1.attn_q.weight", 4),
                                 (attention.k_proj, "blk.1.attn_k.weight", 2)):
        assert module.file_order_head_rows == 16
        in_file = torch.from_numpy(model_file.tensor_f32(name))
        assert torch.equal(module.weight.float(), in_file)  # as stored: the rotary halves interleaved
        checkpoint[name] = open_model(path).weights.tensor(f"model.layers.1.self_attn.{name[11]}_proj.weight")
        assert not torch.equal(checkpoint[name], in_file)
        with torch.inference_mode():
            assert torch.equal(storage.widened(module.weight, torch.float32, 16), checkpoint[name])
        assert torch.equal(storage.widened(module.weight, torch.float32, 16), checkpoint[name])  # autograd: a copy
        with monkeypatch.context() as patch:
            patch.setattr(storage, "WIDEN_WHOLE_MAX_VALUES", 20 * 64)  # 20 rows: blocks of one whole head
            assert storage.output_blocks(module) == [slice(rows, rows + 16) for rows in range(0, 16 * n_head, 16)]
    assert attention.v_proj.file_order_head_rows == 0
    # computing in float16, nothing is widened: the rows are reordered at load, as a copy
    q_in_float16 = load_model(path, dtype=torch.float16).model.model.layers[1].self_attn.q_proj
    assert type(q_in_float16) is torch.nn.Linear
    assert torch.equal(q_in_float16.weight.float(), checkpoint["blk.1.attn_q.weight"])


def test_siblings_reading_one_input_computed_as_one_matmul(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(write_tiny_llama_gguf(tmp_path / "f16.gguf", dtype=np.float16))
    attention, mlp = loaded.model.model.layers[0].self_attn, loaded.model.model.layers[0].mlp
    qkv, gate_up = attention.q_proj.input_siblings, mlp.up_proj.input_siblings
    assert qkv.members == [attention.q_proj, attention.k_proj, attention.v_proj]
    assert gate_up.members == [mlp.gate_proj, mlp.up_proj]
    assert attention.o_proj.input_siblings is mlp.down_proj.input_siblings is None
    x = torch.randn(2, 5, loaded.config.hidden_size, generator=torch.Generator().manual_seed(5))
    matmuls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: matmuls.append(args[1].shape) or linear(*args))
    with torch.inference_mode():
        alone = [member.own_output(x) for member in qkv.members]
        matmuls.clear()
        joint = [member(x) for member in qkv.members]
        assert matmuls == [(sum(qkv.rows), loaded.config.hidden_size)]
        # the same bits with MKL's AVX-512 sgemm; other kernels may round a column of a wider matrix otherwise
        for own, shared in zip(alone, joint, strict=True):
            torch.testing.assert_close(shared, own, rtol=1e-5, atol=1e-5)
        # a member's output is handed out once, and only for the very input it was computed from
        assert torch.equal(attention.k_proj(x), alone[1]) and len(matmuls) == 2
        y = x.clone()
        attention.q_proj(x)
        assert torch.equal(attention.v_proj(y), alone[2]) and len(matmuls) == 4
    matmuls.clear()
    assert torch.equal(attention.k_proj(x), alone[1]) and len(matmuls) == 1  # with autograd: each alone
