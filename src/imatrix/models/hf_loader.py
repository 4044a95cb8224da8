"""Hugging Face checkpoint directories (config.json + safetensors), loaded with transformers."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors import SafetensorError

from imatrix.errors import ImatrixError
from imatrix.models.patches import use_collection_forwards

if TYPE_CHECKING:
    from imatrix.models.loader import LoadedModel
    from imatrix.models.open import OpenedModel


@dataclass
class HFTokenizer:
    tokenizer: transformers.PreTrainedTokenizerBase
    bos_id: int | None
    add_bos: bool

    @classmethod
    def of(cls, tokenizer: transformers.PreTrainedTokenizerBase, directory: Path) -> HFTokenizer:
        return cls(tokenizer, tokenizer.bos_token_id, adds_bos(tokenizer, directory))

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else list(ids)


def adds_bos(tokenizer: transformers.PreTrainedTokenizerBase, directory: Path) -> bool:
    """Whether llama.cpp's converter would mark this tokenizer as adding BOS (gguf-py's `SpecialVocab`):
    its post-processor puts BOS first, or else tokenizer_config.json says `add_bos_token`."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return True
    try:
        configured = json.loads((directory / "tokenizer_config.json").read_text()).get("add_bos_token")
    except (OSError, ValueError):
        return False
    return configured is True


def load_hf_weights(opened: OpenedModel, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    """The opened checkpoint loaded by transformers' `from_pretrained` (its own weight conversions included)."""
    from imatrix.models.loader import loaded_from

    if _is_secondary_rank():  # under torchrun only rank 0 reports progress
        transformers.utils.logging.disable_progress_bar()
    key_mapping = getattr(opened.weights, "key_mapping", None)
    try:
        with _other_towers_unreported(key_mapping is not None):
            model, loading = opened.architecture.model_type().from_pretrained(
                opened.source, config=opened.config, dtype=dtype, key_mapping=key_mapping, output_loading_info=True,
                **dequantized(opened.config))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ImatrixError(f"{opened.source}: cannot load checkpoint ({exc})") from exc
    if key_mapping is not None:
        _check_text_model(opened, loading)
    model = model.to(device)
    model.eval()
    opened.architecture.fix_graph(model)
    use_collection_forwards(model)
    return loaded_from(opened, model)


@contextlib.contextmanager
def _other_towers_unreported(multimodal: bool) -> Iterator[None]:
    """While the text model of a multimodal checkpoint loads, transformers' loading report is not printed: it would
    list every tensor of the other towers (vision, audio) as unexpected. `_check_text_model` reads it instead."""
    report = transformers.utils.logging.get_logger("transformers.modeling_utils")
    without_report = _WithoutLoadReport()
    if multimodal:
        report.addFilter(without_report)
    try:
        yield
    finally:
        report.removeFilter(without_report)


class _WithoutLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _check_text_model(opened: OpenedModel, loading: dict[str, Any]) -> None:
    """What the quiet loading report would have said about the text model of a multimodal checkpoint, refused:
    parameters no tensor made, and text-model tensors (`language_model.`) the model does not take."""
    text_tensors = set(opened.weights.stored_as)  # their names after `TEXT_MODEL_KEYS`
    for problem, names in (("has no tensor for", loading["missing_keys"]),
                           ("has text-model tensors the model does not take:",
                            loading["unexpected_keys"] & text_tensors)):
        if names:
            listed = sorted(names)
            raise ImatrixError(f"{opened.source}: the checkpoint {problem} {', '.join(listed[:5])}"
                               + (f" and {len(listed) - 5} more" if len(listed) > 5 else ""))


def dequantized(config: Any) -> dict[str, Any]:
    """`from_pretrained` arguments that load a pre-quantized checkpoint (gpt-oss's MXFP4 experts, FP8)
    dequantized, where transformers can: quantized kernels would replace the modules that are measured."""
    settings = getattr(config, "quantization_config", None)
    if settings is None:
        return {}
    from transformers.quantizers.auto import AutoQuantizationConfig

    if isinstance(settings, dict):
        settings = AutoQuantizationConfig.from_dict(settings)
    if "dequantize" not in settings.get_loading_attributes():
        return {}
    settings.dequantize = True
    return {"quantization_config": settings}


def _is_secondary_rank() -> bool:
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0
