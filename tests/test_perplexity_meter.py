"""The collector's perplexity: scoring through the output projection a block of the vocabulary at a
time gives the same −log p as the full logits (to float32 rounding), without holding them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imatrix import metrics
from imatrix.metrics import PerplexityMeter
from imatrix.models import storage
from imatrix.models.loader import load_model
from tiny_models import tiny_llama_config, write_tiny_llama_gguf


@pytest.mark.parametrize("file_dtype", [np.float32, np.float16])
def test_blockwise_scoring_equals_scoring_the_full_logits(tmp_path: Path, file_dtype: type,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_llama_config(tied=True)
    head = load_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf", config, dtype=file_dtype)).model.lm_head
    generator = torch.Generator().manual_seed(4)
    hidden = 3 * torch.randn(40, config.hidden_size, generator=generator)
    targets = torch.randint(0, config.vocab_size, (40,), generator=generator)
    monkeypatch.setattr(metrics, "SCORE_BLOCK_VALUES", 37 * config.hidden_size)  # blocks of 37 tokens
    assert len(storage.output_blocks(head, metrics.SCORE_BLOCK_VALUES)) > 5
    with torch.inference_mode():
        logits = head(hidden).double()
        (by_blocks,) = metrics.projected_partials(head, hidden[None], targets[None])
        whole = PerplexityMeter()
        whole.add(head(hidden), targets)
    expected = torch.logsumexp(logits, dim=1) - logits.gather(1, targets.view(-1, 1)).view(-1)
    assert by_blocks.count == whole.count == 40
    assert by_blocks.nll == pytest.approx(float(expected.sum()), rel=1e-6)
    assert by_blocks.nll2 == pytest.approx(float((expected * expected).sum()), rel=1e-6)
    assert whole.nll == pytest.approx(float(expected.sum()), rel=1e-6)


def test_sequences_scored_together_score_as_each_alone(tmp_path: Path) -> None:
    config = tiny_llama_config(tied=True)
    head = load_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf", config, dtype=np.float16)).model.lm_head
    generator = torch.Generator().manual_seed(6)
    hidden = 3 * torch.randn(3, 11, config.hidden_size, generator=generator)
    targets = torch.randint(0, config.vocab_size, (3, 11), generator=generator)
    with torch.inference_mode():
        together = metrics.projected_partials(head, hidden, targets)
        alone = [metrics.projected_partials(head, rows[None], ids[None])[0]
                 for rows, ids in zip(hidden, targets, strict=True)]
        empty = metrics.projected_partials(head, hidden[:, :0], targets[:, :0])
    assert [meter.count for meter in together] == [11, 11, 11]
    for joint, single in zip(together, alone, strict=True):
        # the same rows, in a taller matmul: equal where the sgemm rounds a row alike whatever the height
        # (MKL's AVX-512 kernels), within its last bits elsewhere (AVX2: 8e-9); a row swapped with another
        # sequence's moves them by 6e-3 or more
        assert joint.nll == pytest.approx(single.nll, rel=1e-5)
        assert joint.nll2 == pytest.approx(single.nll2, rel=1e-5)
    assert [meter.count for meter in empty] == [0, 0, 0]  # -c 2 scores nothing
