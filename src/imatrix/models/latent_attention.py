"""Multi-head latent attention (DeepSeek V2/V3): the inputs of llama.cpp's `attn_k_b` and `attn_v_b`.

llama.cpp's converter splits `kv_b_proj` into two 3-D weights, one matrix per head: `attn_k_b` (the
key rows, transposed) and `attn_v_b` (the value rows). Its graph (`src/models/deepseek2.cpp`) runs the
attention in latent space: each head's unrotated query part `q_nope` is multiplied by `attn_k_b`,
and each head's attention output over the latents by `attn_v_b`. transformers expands the latents
into keys and values with `kv_b_proj` instead: the same values, but other matmul inputs. Measured here:

* `attn_k_b`: each head's `q_nope`, the first `qk_nope_head_dim` values of the head in the query
  projection's output;
* `attn_v_b`: each head's attention-weighted sum of the latents. The latents ride along the values
  through transformers' own attention (`expand_kv` appends them to every head's values) and are
  taken off again before `o_proj`, which sees the values it would have seen.
"""

from __future__ import annotations

import torch

from imatrix.models.observers import MatrixSink, ObservedTarget
from imatrix.models.patches import Handle, override_attribute

K_B, V_B = "attn_k_b", "attn_v_b"


def _by_head(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """`[n_seq, n_tokens, n_head · d]` -> `[n_seq, n_head, n_tokens, d]`."""
    return rows.unflatten(-1, (n_head, -1)).transpose(-3, -2)


class LatentAttention:
    """The `Observer` of transformers' MLA modules (those with `kv_b_proj` and `expand_kv`)."""

    def find(self, model: torch.nn.Module, gguf_names: dict[str, tuple[str, ...]]) -> dict[str, ObservedTarget]:
        targets = {}
        for path, module in model.named_modules():
            if not hasattr(module, "expand_kv"):
                continue
            widths = {K_B: module.qk_nope_head_dim, V_B: module.kv_lora_rank}
            for name in gguf_names.get(f"{path}.kv_b_proj.weight", ()):
                role = name.split(".")[2]  # blk.N.<role>.weight
                if role in widths:
                    targets[name] = ObservedTarget(module, role, module.num_heads, widths[role], self)
        return targets

    def attach(self, module: torch.nn.Module, names: dict[str, str], sink: MatrixSink) -> list[Handle]:
        handles: list[Handle] = []
        if K_B in names:
            handles.append(self._observe_queries(module, names[K_B], sink))
        if V_B in names:
            handles.extend(self._observe_latent_output(module, names[V_B], sink))
        return handles

    @staticmethod
    def _observe_queries(module: torch.nn.Module, name: str, sink: MatrixSink) -> Handle:
        query = module.q_b_proj if module.q_proj is None else module.q_proj
        n_nope = module.qk_nope_head_dim

        def hook(_module: torch.nn.Module, _args: tuple, queries: torch.Tensor) -> None:
            sink.observe_matrices(name, _by_head(queries, module.num_heads)[..., :n_nope])

        return query.register_forward_hook(hook)

    @staticmethod
    def _observe_latent_output(module: torch.nn.Module, name: str, sink: MatrixSink) -> list[Handle]:
        expand_kv = type(module).expand_kv
        n_value = module.v_head_dim

        def expand_with_latents(latents: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = expand_kv(module, latents, k_rot)
            return keys, torch.cat([values, latents.expand(-1, values.shape[1], -1, -1)], dim=-1)

        def split_off_latents(_module: torch.nn.Module, args: tuple) -> tuple:
            heads = _by_head(args[0], module.num_heads)  # [n_seq, n_head, n_tokens, v_head_dim + kv_lora_rank]
            sink.observe_matrices(name, heads[..., n_value:])
            return (heads[..., :n_value].transpose(-3, -2).flatten(-2), *args[1:])

        # before the collector's own hook on o_proj, which must see the values alone
        return [override_attribute(module, "expand_kv", expand_with_latents),
                module.o_proj.register_forward_pre_hook(split_off_latents, prepend=True)]
