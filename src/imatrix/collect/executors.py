"""How the model is executed for one batch of chunks (kept apart from what is measured)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from imatrix.models.loader import LoadedModel

if TYPE_CHECKING:
    from imatrix.collect.runner import CollectOptions


def forward_in_memory(loaded: LoadedModel, batch: torch.Tensor, options: CollectOptions) -> torch.Tensor | None:
    """Hidden states through every block; the output projection only where it is needed.

    Returns the logits of the scored positions (n_ctx/2 … n_ctx−2) when perplexity is on.
    """
    model = loaded.model
    hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state
    if options.process_output and not getattr(loaded.config, "tie_word_embeddings", False):
        logits = model.lm_head(hidden)  # all positions, as llama.cpp collects output.weight
        return logits[:, options.n_ctx // 2 : -1] if options.compute_ppl else None
    if not options.compute_ppl:
        return None
    return model.lm_head(hidden[:, options.n_ctx // 2 : -1])
