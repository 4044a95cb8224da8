"""The activation collector's accumulators: one buffer for all dense targets, snapshots that do not
move with later forwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imatrix.collection.hooks import ActivationCollector, ReorderedInput
from imatrix.collection.targets import collection_targets
from imatrix.models.loader import load_model
from tiny_models import write_tiny_llama_gguf


def test_snapshots_are_copies_and_forwards_accumulate(tmp_path: Path) -> None:
    loaded = load_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf", dtype=np.float16))
    ids = torch.randint(0, loaded.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    targets = collection_targets(loaded, process_output=False)
    with ActivationCollector(targets) as collector, torch.inference_mode():
        assert collector.snapshot().tensors == {}  # nothing seen yet: no zero-count entries
        loaded.model(input_ids=ids)
        once = collector.snapshot()
        once_sums = {name: stats.sums.copy() for name, stats in once.tensors.items()}
        loaded.model(input_ids=ids)
        twice = collector.snapshot()
    assert sorted(once.tensors) == sorted(targets) and len(targets) == 2 * 7
    for name, stats in once.tensors.items():
        np.testing.assert_array_equal(stats.sums, once_sums[name])  # untouched by the second forward
        assert stats.counts.tolist() == [24] and twice.tensors[name].counts.tolist() == [48]
        np.testing.assert_allclose(twice.tensors[name].sums, 2 * stats.sums, rtol=1e-6)
    q, k = once.tensors["blk.0.attn_q.weight"], once.tensors["blk.0.attn_k.weight"]
    np.testing.assert_array_equal(q.sums, k.sums)  # same input, separate accumulators
    assert not np.shares_memory(q.sums, k.sums)


def test_reordered_input_reports_sums_in_the_files_column_order() -> None:
    """A weight whose input columns the converter reordered (`ColumnOrder`): the input's sums come out in
    the file's order, beside an ordinary target reading the same input in the module's own order."""
    linear = torch.nn.Linear(4, 3, bias=False)
    file_columns = torch.tensor([2, 0, 3, 1])  # the file's column i holds the module's column file_columns[i]
    rows = torch.arange(1.0, 13.0).reshape(1, 3, 4)
    targets = {"plain": linear, "reordered": ReorderedInput(linear, file_columns)}
    with ActivationCollector(targets) as collector, torch.inference_mode():
        linear(rows)
        matrix = collector.snapshot()
    plain = (rows[0] ** 2).sum(dim=0).numpy()
    np.testing.assert_allclose(matrix["plain"].sums[0], plain)
    np.testing.assert_allclose(matrix["reordered"].sums[0], plain[file_columns.numpy()])
    assert matrix["reordered"].counts.tolist() == [3]
