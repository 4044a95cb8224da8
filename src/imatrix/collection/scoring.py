"""llama-imatrix's perplexity: each chunk's second half scored as it collects, printed `[i]ppl,`."""

from __future__ import annotations

import torch

from imatrix.metrics import PerplexityMeter, projected_partials, scored_positions, scored_targets
from imatrix.models.loader import LoadedModel


def collects_output(loaded: LoadedModel, process_output: bool) -> bool:
    """Whether output.weight is measured: --process-output on a model with an output projection of its own."""
    return process_output and not getattr(loaded.config, "tie_word_embeddings", False)


class ImatrixScorer:
    """The perplexity partial of each chunk: positions n_ctx/2 … n_ctx−2 predicting the next token.

    With --process-output on an untied model every position goes through `output.weight` (its hook measures
    them), as llama.cpp requests all logits; otherwise only the scored half is projected, a block of the
    vocabulary at a time, and nothing at all without perplexity.
    """

    def __init__(self, loaded: LoadedModel, n_ctx: int, compute_ppl: bool, process_output: bool) -> None:
        self.finish = loaded.finish_logits
        self.positions, self.targets = scored_positions(n_ctx), scored_targets(n_ctx)
        self.compute_ppl = compute_ppl
        self.every_position = collects_output(loaded, process_output)
        self.projects_output = compute_ppl or self.every_position

    def score(self, head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor) -> list[PerplexityMeter]:
        if not self.every_position:
            if not self.compute_ppl:
                return []
            return projected_partials(head, hidden[:, self.positions], tokens[:, self.targets], self.finish)
        partials = []
        for sequence, ids in zip(hidden, tokens, strict=True):
            logits = self.finish(head(sequence)[self.positions])
            if self.compute_ppl:
                partial = PerplexityMeter()
                partial.add(logits, ids[self.targets])
                partials.append(partial)
        return partials
