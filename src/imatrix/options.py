"""The options of the public functions (`imatrix.api`), one dataclass per function.

Each field is named after its command-line flag's long form (`--ctx-size` is `ctx_size`), so a
sub-command hands its parsed arguments over as they are (`imatrix.cli.common.options_from`); the
defaults are the flags' defaults, except where a flag's default names a file (the library writes
nothing unless asked). llama-quantize's flags are `imatrix.quant.options.QuantizeOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imatrix.quant.options import QuantizeOptions

if TYPE_CHECKING:
    import torch

# the names --dtype takes besides auto (`models.precision.DTYPES` maps them to torch dtypes)
DTYPE_NAMES = ("bfloat16", "float16", "float32")

__all__ = ["CollectOptions", "ConvertOptions", "MergeOptions", "PerplexityOptions", "QuantizeOptions"]


@dataclass(frozen=True)
class CollectOptions:
    """llama-imatrix's flags (`imatrix -h`)."""

    # -m: a GGUF file or Hugging Face checkpoint folder, a `models.loader.LoadedModel`, or an executor
    # (`pipeline.executors.Executor`); None: the bundled SmolLM2-135M
    model: str | Path | Any | None = None
    file: str | Path | None = None  # -f, the calibration text; None: the bundled calibration.txt
    output_file: str | Path | None = None  # -o; None: the result is only returned
    ctx_size: int = 512  # -c: tokens per chunk
    batch_size: int = 2048  # -b: batch_size / ctx_size chunks per batch, clamped to whole chunks
    from_chunk: int = 0  # --chunk: chunks of the text skipped
    chunks: int = -1  # --chunks: at most this many (-1: all)
    ppl: bool = True  # --ppl / --no-ppl
    process_output: bool = False  # also collect output.weight
    parse_special: bool = False
    in_file: Sequence[str | Path] = ()  # imatrix files whose statistics the collection continues
    output_format: str | None = None  # gguf or dat; None: gguf, with a warning for another suffix
    output_frequency: int = 10  # -ofreq: save the output every N chunks
    save_frequency: int = 0  # also write <output>.at_<N> every N chunks
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    n_gpu_layers: int | None = None  # -ngl: 0 forces the CPU
    # compute dtype (a torch.dtype or its name; None or "auto": the device's fastest faithful one,
    # `models.precision`); statistics accumulate in float32 regardless
    dtype: torch.dtype | str | None = None
    sequential: bool | None = None  # layer by layer; None: when the weights would not fit in memory
    window_chunks: int = 64  # sequential: chunks pushed through each loaded layer at most
    # model in memory on the CPU: chunks run at once, each in its own thread (0: the executor's default)
    chunks_in_flight: int = 0
    threads: int = 0  # -t / -tb: CPU threads (torch.set_num_threads); 0: torch's choice
    resume: bool = False  # continue from output_file's chunk_count
    dataset_name: str | None = None  # recorded in imatrix.datasets (no flag); default: the text's path

    @property
    def n_seq(self) -> int:
        return max(1, self.batch_size // self.ctx_size)

    @property
    def clamped_batch_size(self) -> int:
        """-b as llama-imatrix clamps it: whole chunks (n_seq·n_ctx) from n_ctx up, as given below it."""
        return min(self.batch_size, self.n_seq * self.ctx_size)


@dataclass(frozen=True)
class MergeOptions:
    """`imatrix --in-file a --in-file b -o merged`: files summed as llama-imatrix sums them."""

    in_file: Sequence[str | Path] = ()
    output_file: str | Path | None = None  # None: the merge is only returned
    output_format: str | None = None  # gguf or dat; None: gguf, with a warning for another suffix
    ctx_size: int = 512  # the chunk size a legacy .dat is read with


@dataclass(frozen=True)
class ConvertOptions:
    """`imatrix --in-file x.gguf --output-format dat -o x.dat`, and back."""

    in_file: str | Path = ""
    output_file: str | Path = ""
    output_format: str | None = None  # gguf or dat; None: gguf, with a warning for another suffix
    ctx_size: int = 512  # the chunk size a legacy .dat is read with


@dataclass(frozen=True)
class PerplexityOptions:
    """llama-perplexity's flags (`imatrix perplexity -h`): perplexity, or with `kl_divergence` the KL
    divergence from a base model's log-probabilities."""

    model: str | Path | Any | None = None  # as `CollectOptions.model`
    file: str | Path | None = None  # -f, the text (not with kl_divergence: the base file holds the tokens)
    ctx_size: int = 512
    chunks: int = -1
    batch_size: int = 2048  # n_seq = batch_size / ctx_size chunks per batch
    # without kl_divergence: where to save the base log-probabilities; with it: where to read them
    kl_divergence_base: str | Path | None = None
    kl_divergence: bool = False
    parse_special: bool = False
    round_to_f16: bool = False  # every quantized weight rounded to F16 first
    emulate_llama_cpu: bool = False  # matmul inputs rounded as llama.cpp's CPU backend rounds them
    device: str = "auto"
    n_gpu_layers: int | None = None
    dtype: torch.dtype | str | None = "float32"  # as `CollectOptions.dtype`
    sequential: bool | None = None  # as `CollectOptions.sequential`
    window_chunks: int = 64
    chunks_in_flight: int = 0
    threads: int = 0  # as `CollectOptions.threads`
