"""The architecture adapters, one module per model family; each module lists its `ARCHITECTURES`.

Adding a family is adding a module here (see `docs/architectures.md`): this package finds it.
"""

from __future__ import annotations

import importlib
import pkgutil

from imatrix.errors import ImatrixError
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures.base import Architecture

GUIDE = "docs/architectures.md"


def _discover() -> tuple[Architecture, ...]:
    found: list[Architecture] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            found.extend(importlib.import_module(f"{__name__}.{module.name}").ARCHITECTURES)
    # variants (which share a GGUF name with a plainer adapter) are asked first
    return tuple(sorted(found, key=lambda arch: (arch.gguf_name, not arch.is_variant)))


ALL: tuple[Architecture, ...] = _discover()


def supported_gguf_names() -> list[str]:
    return sorted({arch.gguf_name for arch in ALL})


def architecture_for_file(model_file: GGUFModelFile) -> Architecture:
    """The adapter for a GGUF model file, by `general.architecture` (and, for variants, its contents)."""
    name = model_file.architecture
    for arch in ALL:
        if arch.gguf_name == name and arch.applies_to(model_file):
            return arch
    raise ImatrixError(f"{model_file.path}: architecture '{name}' is not supported (supported: "
                       f"{', '.join(supported_gguf_names())}; adding one: {GUIDE})")


def architecture_for_hf(model_type: str, source: object, hf_config: dict | None = None) -> Architecture:
    """The adapter for a Hugging Face checkpoint, by its config.json `model_type` (and, for variants, the rest
    of its config.json, `hf_config`)."""
    for arch in ALL:
        if model_type in arch.hf_model_types and arch.applies_to_hf(hf_config or {}):
            return arch
    supported = sorted({kind for arch in ALL for kind in arch.hf_model_types})
    raise ImatrixError(f"{source}: model_type '{model_type}' is not supported (supported: {', '.join(supported)}; "
                       f"adding one: {GUIDE})")
