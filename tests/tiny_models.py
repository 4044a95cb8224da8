"""Tiny random-weight models written to disk, for tests that need a real model file but not a real model.

`write_tiny_llama_gguf` writes a llama GGUF the way llama.cpp's converter does (tensor names, q/k row
permutation, gpt2 byte-level BPE vocab), so it loads through `imatrix.models.loader` like any other.
`write_tiny_llama_hf` writes the same weights as a Hugging Face directory (config, safetensors, tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

# GPT-2's pre-tokenizer regex: llama.cpp's "gpt-2" splitting, so the HF side tokenizes as the GGUF side
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s"]
BOS = "<s>"


def tiny_llama_config(n_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, tied: bool = False) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=len(tiny_vocab()), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
        tie_word_embeddings=tied, bos_token_id=len(tiny_vocab()) - 1, eos_token_id=len(tiny_vocab()) - 1,
    )


def tiny_vocab() -> list[str]:
    byte_chars = list(_bytes_to_unicode().values())
    merged = [left + right for left, right in (merge.split(" ") for merge in MERGES)]
    return [*byte_chars, *merged, BOS]


def tiny_llama_state(config: transformers.LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with a sane scale (norm weights near 1), as the checkpoint names them."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn_like(tensor)
        else:
            state[name] = torch.randn_like(tensor) * (0.5 if "embed" in name else 0.08)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_tiny_llama_gguf(path: Path, config: transformers.LlamaConfig | None = None, seed: int = 0,
                          dtype: type | torch.dtype = np.float32) -> Path:
    """A llama GGUF with random weights (F32 norms; matrices in `dtype`: float32, float16 or torch.bfloat16)."""
    config = config or tiny_llama_config()
    state = tiny_llama_state(config, seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    write_metadata(writer, config)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in state.items():
        gguf_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        values = tensor.numpy()
        if gguf_name.endswith("attn_q.weight"):
            values = permute_rows(values, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            values = permute_rows(values, config.num_key_value_heads)
        if values.ndim == 1:
            writer.add_tensor(gguf_name, values.astype(np.float32))
        elif dtype == torch.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(values)).bfloat16().view(torch.int16).numpy()
            writer.add_tensor(gguf_name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(gguf_name, values.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama_hf(directory: Path, config: transformers.LlamaConfig | None = None, seed: int = 0) -> Path:
    """The same random model as a Hugging Face checkpoint directory (safetensors + tokenizer.json)."""
    from safetensors.torch import save_file

    config = config or tiny_llama_config()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file({name: tensor.contiguous() for name, tensor in tiny_llama_state(config, seed).items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_hf_tokenizer(), bos_token=BOS, eos_token=BOS)
    fast.save_pretrained(directory)
    return directory


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: the inverse of `imatrix.models.architectures.unpermute_rows`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_metadata(writer: gguf.GGUFWriter, config: transformers.LlamaConfig) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    vocab = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(vocab) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(vocab) - 1)
    writer.add_eos_token_id(len(vocab) - 1)
    writer.add_add_bos_token(True)


def _hf_tokenizer() -> Tokenizer:
    vocab = tiny_vocab()
    bpe = models.BPE(vocab={token: i for i, token in enumerate(vocab)},
                     merges=[tuple(merge.split(" ")) for merge in MERGES], fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))
