"""What every `imatrix` subcommand's parser shares."""

from __future__ import annotations

import argparse
import os
import sys

from imatrix.errors import ImatrixError

# threads or worker processes beyond this many per core only cost memory (and, past the system's limit, crash)
MAX_THREADS_PER_CORE = 4


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line like any other bad input: one line, exit code 1."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ImatrixError(message)


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


def add_ignored_llama_cpp_flags(parser: argparse.ArgumentParser) -> None:
    """llama.cpp's common performance flags, accepted so that a llama.cpp command line runs unchanged.

    They tune llama.cpp's own runtime (KV cache, flash attention, micro-batches, mmap) and have no
    counterpart here. Registered, they also stop argparse from gluing them onto our short flags
    (`-fa` read as `-f a`, `-ctk` as `-c tk`).
    """
    group = parser.add_argument_group("llama.cpp runtime flags, accepted and ignored")
    group.add_argument("-fa", "--flash-attn", nargs="?", const="on", metavar="on|off|auto", help=argparse.SUPPRESS)
    group.add_argument("-ub", "--ubatch-size", type=int, metavar="N", help=argparse.SUPPRESS)
    group.add_argument("-ctk", "--cache-type-k", metavar="TYPE", help=argparse.SUPPRESS)
    group.add_argument("-ctv", "--cache-type-v", metavar="TYPE", help=argparse.SUPPRESS)
    group.add_argument("-nkvo", "--no-kv-offload", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--no-mmap", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--mlock", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("-np", "--parallel", type=int, metavar="N", help=argparse.SUPPRESS)
    # where llama.cpp places tensors and experts (CPU or which GPU)
    group.add_argument("-ot", "--override-tensor", metavar="PATTERN=TYPE", help=argparse.SUPPRESS)
    group.add_argument("-cmoe", "--cpu-moe", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("-ncmoe", "--n-cpu-moe", type=int, metavar="N", help=argparse.SUPPRESS)
    group.add_argument("-sm", "--split-mode", metavar="none|layer|row", help=argparse.SUPPRESS)
    group.add_argument("-ts", "--tensor-split", metavar="N0,N1,...", help=argparse.SUPPRESS)
    group.add_argument("-mg", "--main-gpu", type=int, metavar="N", help=argparse.SUPPRESS)
    group.description = ("-fa/--flash-attn, -ub/--ubatch-size, -ctk/--cache-type-k, -ctv/--cache-type-v, "
                         "-nkvo/--no-kv-offload, --no-mmap, --mlock, -np/--parallel, -ot/--override-tensor, "
                         "-cmoe/--cpu-moe, -ncmoe/--n-cpu-moe, -sm/--split-mode, -ts/--tensor-split, "
                         "-mg/--main-gpu")
