"""Hugging Face checkpoint directories (config.json + safetensors), loaded with transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError

from imatrix.errors import ImatrixError
from imatrix.models.loader import LoadedModel, gguf_name_map, hf_architecture, use_collection_forwards


@dataclass
class HFTokenizer:
    tokenizer: transformers.PreTrainedTokenizerBase
    bos_id: int | None
    add_bos: bool

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else list(ids)


def load_hf_model(directory: Path, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    architecture = hf_architecture(directory)
    if not any(directory.glob("*.safetensors")):
        raise ImatrixError(f"{directory}: no *.safetensors weights found")
    if _is_secondary_rank():  # under torchrun only rank 0 reports progress
        transformers.utils.logging.disable_progress_bar()
    try:
        model = architecture.model_type().from_pretrained(directory, dtype=dtype).to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ImatrixError(f"{directory}: cannot load checkpoint ({exc})") from exc
    model.eval()
    use_collection_forwards(model)
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    wrapped = HFTokenizer(tokenizer, tokenizer.bos_token_id, add_bos)
    names = gguf_name_map(model, architecture, model.config.num_hidden_layers)
    return LoadedModel(model, wrapped, architecture, names, directory)


def _is_secondary_rank() -> bool:
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0
