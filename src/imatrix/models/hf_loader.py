"""Hugging Face checkpoint directories (config.json + safetensors), loaded with transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    def of(cls, tokenizer: transformers.PreTrainedTokenizerBase) -> HFTokenizer:
        return cls(tokenizer, tokenizer.bos_token_id, bool(getattr(tokenizer, "add_bos_token", False)))

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else list(ids)


def load_hf_weights(opened: OpenedModel, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    """The opened checkpoint loaded by transformers' `from_pretrained` (its own weight conversions included)."""
    from imatrix.models.loader import loaded_from

    if _is_secondary_rank():  # under torchrun only rank 0 reports progress
        transformers.utils.logging.disable_progress_bar()
    try:
        model = opened.architecture.model_type().from_pretrained(opened.source, dtype=dtype).to(device)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ImatrixError(f"{opened.source}: cannot load checkpoint ({exc})") from exc
    model.eval()
    use_collection_forwards(model)
    return loaded_from(opened, model)


def _is_secondary_rank() -> bool:
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0
