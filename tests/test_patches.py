"""The runtime patches of transformers' modules are refused on a release they were not checked against."""

from __future__ import annotations

import pytest
import torch

from imatrix import ImatrixError
from imatrix.models import patches


def test_the_installed_transformers_passes() -> None:
    patches.check_transformers()


@pytest.mark.parametrize("version", ["6.0.0", "4.57.1"])
def test_another_major_release_is_refused(version: str) -> None:
    with pytest.raises(ImatrixError, match=rf"transformers {version} is not supported"):
        patches.check_transformers(version)


def test_a_moved_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    moved = {**patches.TRANSFORMERS_INTERNALS, "transformers.core_model_loading": ("no_such_function",)}
    monkeypatch.setattr(patches, "TRANSFORMERS_INTERNALS", moved)
    with pytest.raises(ImatrixError, match=r"lacks transformers.core_model_loading.no_such_function"):
        patches.check_transformers()


def test_an_overridden_method_is_restored() -> None:
    linear = torch.nn.Linear(2, 2)
    handle = patches.override_attribute(linear, "forward", lambda x: x * 0)
    assert linear(torch.ones(2)).abs().sum() == 0
    handle.remove()
    assert torch.equal(linear(torch.ones(2)), torch.nn.Linear.forward(linear, torch.ones(2)))
