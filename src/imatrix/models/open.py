"""One way to open a model: GGUF file or Hugging Face directory -> skeleton, GGUF names, tokenizer, weights.

Every path that runs a model starts here: in memory (`models.loader.load_model` fills the skeleton),
layer by layer (`pipeline.sequential`), on several ranks, and `imatrix perplexity`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import imatrix.quant  # noqa: F401  (makes this project's own tensor types, Q3_K_HIFI, readable)
from imatrix.errors import ImatrixError, shown
from imatrix.ggufio.reader import GGUFModelFile
from imatrix.models.architectures import architecture_for_file, architecture_for_hf
from imatrix.models.architectures.base import Architecture
from imatrix.models.names import GGUFNames, expert_stack_map, gguf_name_map
from imatrix.models.patches import use_collection_forwards
from imatrix.models.rope import apply_rope_freq_factors
from imatrix.models.tokenizer import TextTokenizer, tokenizer_from_gguf
from imatrix.models.weights import TEXT_MODEL_KEYS, GGUFWeights, SafetensorsWeights, WeightSource


@dataclass
class OpenedModel:
    """A model whose weights are not loaded yet: its modules are on the meta device."""

    skeleton: torch.nn.Module  # a transformers *ForCausalLM
    architecture: Architecture
    gguf_names: GGUFNames  # parameter (model.layers.0.self_attn.q_proj.weight) -> its GGUF tensors
    tokenizer: TextTokenizer
    weights: WeightSource
    source: Path
    # 3-D expert parameter -> the GGUF stacks (`blk.N.ffn_gate_exps.weight`, …) it is made of
    expert_stacks: GGUFNames = field(default_factory=dict)

    @property
    def config(self) -> Any:  # a transformers PretrainedConfig
        return self.skeleton.config

    @property
    def model_file(self) -> GGUFModelFile | None:
        return self.weights.model_file if isinstance(self.weights, GGUFWeights) else None


def open_model(path: str | Path, device: str | torch.device = "cpu") -> OpenedModel:
    """Open `path` (a .gguf file or a Hugging Face checkpoint directory); rotary tables go to `device`."""
    source = Path(path)
    if source.is_dir():
        return _open_hf(source, device)
    model_file = GGUFModelFile(source)
    architecture = architecture_for_file(model_file)
    config, skeleton = _built(architecture, model_file, device)
    apply_rope_freq_factors(skeleton, model_file)
    n_blocks = config.num_hidden_layers
    names = gguf_name_map(skeleton, architecture, n_blocks)
    stacks = expert_stack_map(skeleton, architecture, n_blocks)
    weights = GGUFWeights(model_file, architecture, config, names, stacks)
    return OpenedModel(skeleton, architecture, names, tokenizer_from_gguf(model_file), weights, source, stacks)


def _built(architecture: Architecture, model_file: GGUFModelFile, device: str | torch.device) -> tuple[Any, Any]:
    """The config and the empty model the file's hyperparameters describe; transformers' refusal of them (an odd
    head size, say: a corrupt file) as one line naming the file."""
    _check_hyperparameters(model_file)
    try:
        config = architecture.build_config(model_file)
        return config, empty_model(architecture, config, device)
    except (ImatrixError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  (transformers validates with its own exception types)
        reason = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise ImatrixError(f"{model_file.path}: its hyperparameters do not make a {architecture.gguf_name} model: "
                           f"{reason}") from exc


def _check_hyperparameters(model_file: GGUFModelFile) -> None:
    """Sizes the file's tensors can hold, before a model is built from them: a corrupt value would otherwise
    drop layers without a word, or take hours (a million blocks) or gigabytes (a rotary table) to build.

    No `blk.N.` tensor beyond `<arch>.block_count` (llama.cpp refuses a file with tensors it does not load),
    not more blocks than tensors, no head size larger than every tensor dimension, and no float (a rope base,
    an epsilon) that is NaN or infinite.
    """
    arch = model_file.architecture
    n_blocks = model_file.arch_value("block_count")
    if isinstance(n_blocks, int):  # a missing count is the config's to report
        if n_blocks > len(model_file.tensors):
            raise ImatrixError(f"{model_file.path}: {arch}.block_count is {n_blocks}, more blocks than the file has "
                               f"tensors ({len(model_file.tensors)})")
        for name in model_file.tensors:
            block = re.match(r"blk\.(\d+)\.", name)
            if block and int(block[1]) >= n_blocks:
                raise ImatrixError(f"{model_file.path}: tensor {shown(name)} lies beyond the {n_blocks} blocks that "
                                   f"{arch}.block_count states")
    largest = max((max(info.ne) for info in model_file.tensors.values()), default=0)
    for key, value in model_file.metadata.items():
        head_size = key.startswith(f"{arch}.") and re.search(r"key_length|value_length|rope\.dimension_count", key)
        if head_size and isinstance(value, int) and value > largest:
            raise ImatrixError(f"{model_file.path}: {key} is {value}, larger than any tensor dimension ({largest})")
        if key.startswith(f"{arch}.") and isinstance(value, float) and not math.isfinite(value):
            raise ImatrixError(f"{model_file.path}: {key} is {value}")


def _open_hf(directory: Path, device: str | torch.device) -> OpenedModel:
    import transformers

    from imatrix.models.hf_loader import HFTokenizer

    hf_config = read_hf_config(directory)
    text_config = _text_config(directory, hf_config)
    as_converted = {**hf_config, **(text_config or {})}  # the converter reads the text model's entries over the rest
    architecture = architecture_for_hf(hf_config.get("model_type", "?"), directory, as_converted)
    weights = SafetensorsWeights(directory, key_mapping=TEXT_MODEL_KEYS if text_config else None)
    try:
        config = (architecture.config_type().from_pretrained(directory) if text_config is None
                  else text_model_config(architecture, hf_config))
        architecture.adapt_hf_config(config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ImatrixError(f"{directory}: cannot load checkpoint ({exc})") from exc
    skeleton = empty_model(architecture, config, device)
    weights.model = skeleton  # its parameters are made from the checkpoint as transformers makes them
    names = gguf_name_map(skeleton, architecture, config.num_hidden_layers)
    stacks = expert_stack_map(skeleton, architecture, config.num_hidden_layers)
    return OpenedModel(skeleton, architecture, names, HFTokenizer.of(tokenizer, directory), weights, directory, stacks)


def _text_config(directory: Path, hf_config: dict) -> dict | None:
    """A multimodal checkpoint's `text_config` (llama.cpp converts its text model; the other towers go to an mmproj
    file); None for a text model's checkpoint."""
    text_config = hf_config.get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        raise ImatrixError(f"{directory}: config.json's text_config is not an object")
    return text_config


def text_model_config(architecture: Architecture, hf_config: dict) -> Any:
    """The text model's config of a multimodal checkpoint: its `text_config`, with what the whole model states for
    it besides (whether the output projection is the embeddings, the quantization of its tensors)."""
    whole = {key: hf_config[key] for key in ("tie_word_embeddings", "quantization_config") if key in hf_config}
    return architecture.config_type().from_dict({**hf_config["text_config"], **whole})


def empty_model(architecture: Architecture, config: Any, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The transformers model on the meta device, with our forwards; rotary tables on `device`."""
    with torch.device("meta"):
        model = architecture.model_type()(config)
    architecture.fix_graph(model)
    use_collection_forwards(model)
    rebuild_meta_buffers(model, device)
    return model.eval()


def rebuild_meta_buffers(model: torch.nn.Module, device: str | torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq, embedding scales) are not in any checkpoint: made on
    `device` and filled by the model's own `_init_weights`, as transformers' `from_pretrained` does."""
    owners = set()
    for name, buffer in model.named_non_persistent_buffers():
        if buffer.is_meta:
            path, _, attribute = name.rpartition(".")
            model.get_submodule(path)._buffers[attribute] = torch.empty_like(buffer, device=device)
            owners.add(path)
    # an enclosing module's `_init_weights` may fill them too (Falcon-H1's decoder fills its mixers' µP
    # vectors): the owners and every module around them, outermost first
    with torch.no_grad():
        for path, module in model.named_modules():
            if any(_encloses(path, owner) for owner in owners):
                _sub_model(model, path)._init_weights(module)


def _sub_model(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The innermost transformers model around the module at `path`: its `_init_weights` is the one
    `from_pretrained` uses there (`smart_apply`; Gemma 3n's text model reads its own `hidden_size`)."""
    from transformers import PreTrainedModel

    parts = path.split(".") if path else []
    enclosing = (model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts) + 1))
    return [module for module in enclosing if isinstance(module, PreTrainedModel)][-1]


def _encloses(path: str, inner: str) -> bool:
    return not path or inner == path or inner.startswith(f"{path}.")


def read_hf_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ImatrixError(f"{directory}: not a Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ImatrixError(f"{config_path}: invalid JSON ({exc.msg})") from exc
