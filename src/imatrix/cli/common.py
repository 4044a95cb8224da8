"""What every `imatrix` subcommand's parser shares."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, TypeVar

from imatrix.errors import ImatrixError
from imatrix.reporter import INFO, WARN, ProgressBar, Reporter

# threads or worker processes beyond this many per core only cost memory (and, past the system's limit, crash)
MAX_THREADS_PER_CORE = 4

# llama.cpp's log levels for -lv (common/log.h): warnings print from 2, progress ("info") lines from 3
LLAMA_LOG_WARN = WARN
LLAMA_LOG_INFO = INFO

Options = TypeVar("Options")

# llama.cpp flags that tune only its own runtime (threads' CPU placement, model loading, KV cache, offloading,
# log decoration) or the sampling these tools never do: (names, how many values: 0, 1 or "?" for optional)
IGNORED_LLAMA_CPP_FLAGS: tuple[tuple[tuple[str, ...], int | str], ...] = (
    (("-fa", "--flash-attn"), "?"), (("-ub", "--ubatch-size"), 1),
    (("-ctk", "--cache-type-k"), 1), (("-ctv", "--cache-type-v"), 1),
    (("-kvo", "--kv-offload"), 0), (("-nkvo", "--no-kv-offload"), 0),
    (("-kvu", "--kv-unified"), 0), (("-no-kvu", "--no-kv-unified"), 0),
    (("--swa-full",), 0), (("-dt", "--defrag-thold"), 1), (("-np", "--parallel"), 1),
    (("--mmap",), 0), (("--no-mmap",), 0), (("--mlock",), 0), (("-lm", "--load-mode"), 1),
    (("-lzm", "--lazy-mode"), 1), (("--repack",), 0), (("-nr", "--no-repack"), 0), (("--no-host",), 0),
    (("--check-tensors",), 0), (("--numa",), 1),
    (("-C", "--cpu-mask"), 1), (("-Cr", "--cpu-range"), 1), (("--cpu-strict",), 1), (("--prio",), 1),
    (("--poll",), 1), (("-Cb", "--cpu-mask-batch"), 1), (("-Crb", "--cpu-range-batch"), 1),
    (("--cpu-strict-batch",), 1), (("--prio-batch",), 1), (("--poll-batch",), 1),
    (("-ot", "--override-tensor"), 1), (("-cmoe", "--cpu-moe"), 0), (("-ncmoe", "--n-cpu-moe"), 1),
    (("-ncffn", "--n-cpu-ffn"), 1), (("-sm", "--split-mode"), 1), (("-ts", "--tensor-split"), 1),
    (("-mg", "--main-gpu"), 1), (("-fit", "--fit"), "?"), (("-fitt", "--fit-target"), 1),
    (("-fitc", "--fit-ctx"), 1), (("--op-offload",), 0), (("--no-op-offload",), 0),
    (("--warmup",), 0), (("--no-warmup",), 0), (("-s", "--seed"), 1), (("--no-escape",), 0),
    (("--perf",), 0), (("--no-perf",), 0), (("--log-colors",), "?"), (("--log-prefix",), 0),
    (("--no-log-prefix",), 0), (("--log-timestamps",), 0), (("--no-log-timestamps",), 0),
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line like any other bad input: one line, exit code 1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ImatrixError(message)

    def _get_option_tuples(self, option_string: str) -> list[tuple[Any, ...]]:
        # llama.cpp knows a flag only by its whole name; argparse would also take `-fit off` as `-f it off`,
        # `-bf x` as `-b f`, `-s 1` as `-sm 1` (a prefix: Python 3.11 ignores allow_abbrev for one dash)
        if not option_string.startswith("--"):
            return []
        return super()._get_option_tuples(option_string)


def positive_int(text: str) -> int:
    """argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {value})")
    return value


def capped_threads(requested: int, what: str = "threads") -> int:
    """`requested` threads or workers, at most `MAX_THREADS_PER_CORE` per core (a warning says so)."""
    cap = MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
    if requested > cap:
        print(f"imatrix: warning: {requested} {what} requested, using {cap} ({MAX_THREADS_PER_CORE} per core)",
              file=sys.stderr)
        return cap
    return requested


def gpu_layers(text: str) -> int:
    """argparse type for -ngl: a number, or llama.cpp's `auto` (-1) and `all` (-2)."""
    special = {"auto": -1, "all": -2}
    if text in special:
        return special[text]
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'auto' or 'all' (got '{text}')") from None


def device_name(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda, cuda:N, or llama.cpp's -dev names `none` (the CPU), CUDA<N>."""
    name = text.strip().lower()
    if "," in name:
        raise argparse.ArgumentTypeError(f"one device at a time (got '{text}'; several GPUs: run under torchrun)")
    numbered = re.fullmatch(r"cuda:?(\d+)", name)
    if numbered:
        return f"cuda:{numbered.group(1)}"
    if name == "none":
        return "cpu"
    if name in ("auto", "cpu", "cuda"):
        return name
    raise argparse.ArgumentTypeError(f"unknown device '{text}' (auto, cpu, cuda, cuda:N; llama.cpp's none, CUDA<N>)")


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and llama.cpp's -ngl: where the model runs."""
    parser.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=gpu_layers, default=None, metavar="N",
                        help="accepted for compatibility: 0 forces the CPU, anything else (a number, auto, all) "
                             "selects the GPU if there is one")
    parser.add_argument("-dev", "--device", type=device_name, default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where the model runs (default: auto, the GPU if there is one); llama.cpp's "
                             "none and CUDA<N> mean cpu and cuda:N")


def add_executor_flags(parser: argparse.ArgumentParser) -> None:
    """How the forward passes run: layer by layer, and chunks at once in memory."""
    add = parser.add_argument
    add("--sequential", action=argparse.BooleanOptionalAction, default=None,
        help="run one layer at a time, loading each from the model file (default: only when the "
             "weights would not fit in memory)")
    add("--window-chunks", type=positive_int, default=64,
        help="with --sequential: chunks pushed through each loaded layer at most (default: 64)")
    add("--chunks-in-flight", type=int, default=0,
        help="model in memory on the CPU: chunks computed at once, each in its own thread on "
             "threads/N threads (default: 2 with two threads or more)")


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """llama.cpp's -lv (its levels: results only below 2, warnings from 2, progress from 3) and -v."""
    parser.add_argument("-lv", "--verbosity", "--log-verbosity", type=int, default=LLAMA_LOG_INFO, metavar="N",
                        help="as llama.cpp's: 0 or 1 only results (the perplexity lines), 2 warnings too, "
                             "3 or more progress, timings and saves too (default: 3)")
    parser.add_argument("-v", "--verbose", "--log-verbose", dest="verbosity", action="store_const", const=99,
                        help="print everything (-lv 99)")


def add_ignored_llama_cpp_flags(parser: argparse.ArgumentParser) -> None:
    """llama.cpp's runtime flags (`IGNORED_LLAMA_CPP_FLAGS`), accepted so that a llama.cpp command line runs
    unchanged. They have no counterpart here: PyTorch places and computes the model its own way."""
    group = parser.add_argument_group("llama.cpp runtime flags, accepted and ignored")
    for names, values in IGNORED_LLAMA_CPP_FLAGS:
        if values == 0:
            group.add_argument(*names, action="store_true", help=argparse.SUPPRESS)
        else:
            group.add_argument(*names, nargs=None if values == 1 else values, help=argparse.SUPPRESS)
    group.description = ("attention, KV cache, loading, placement, CPU threads, logging: -fa, -ub, -ctk, -ctv, -np, "
                         "-ot, -cmoe, -ncmoe, -sm, -ts, -mg, -fit, --numa, --no-mmap, -s and more (docs/cli.md)")


def options_from(options_class: type[Options], args: argparse.Namespace, **changed: Any) -> Options:
    """The parsed arguments as the library's options: every field of `options_class` (`imatrix.options`) is a
    flag's `dest` of the same name; `changed` replaces what the command line turns into something else."""
    names = {field.name for field in dataclasses.fields(options_class)}
    given = {name: value for name, value in vars(args).items() if name in names}
    return options_class(**{**given, **changed})


def console_reporter(verbosity: int = LLAMA_LOG_INFO) -> Reporter:
    """The library's messages on the console as llama.cpp's tools print them: results on stdout, the rest on
    stderr as `-lv` allows, a progress bar with the information lines."""
    return Reporter(verbosity, output=_to_stdout, messages=_to_stderr, progress_bar=_token_bar)


def _to_stdout(text: str) -> None:
    print(text, end="", flush=True)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _token_bar(total: int, desc: str) -> ProgressBar:
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, file=sys.stderr, desc=desc)
