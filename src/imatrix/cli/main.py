"""`imatrix`: llama-imatrix's flags by default, plus subcommands. Parsing only; the work is in the library."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from imatrix.errors import ImatrixError

# subcommand -> module under imatrix.cli exposing `main(argv: list[str]) -> int`
SUBCOMMANDS = {
    "quantize": "quantize",
    "perplexity": "perplexity",
    "report": "report",
    "compare": "compare",
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread: what Ctrl-C undoes (temporary files, locks, workers) is undone."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    module_name = SUBCOMMANDS.get(args[0]) if args else None
    try:
        with _terminated_on_sigterm(), _warnings_as_lines():
            if module_name is not None:
                module = importlib.import_module(f"imatrix.cli.{module_name}")
                return module.main(args[1:])
            from imatrix.cli import collect

            return collect.main(args)
    except ImatrixError as exc:
        print(f"imatrix: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("imatrix: error: out of memory (for collection, --sequential runs one layer at a time)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imatrix: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("imatrix: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # the reader of our stdout left (`| head`): end quietly, as a C tool dies of SIGPIPE
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE


def _stdout_to_devnull() -> None:
    """So that flushing stdout at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def _terminated_on_sigterm() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warnings_as_lines() -> contextlib.AbstractContextManager[None]:
    """Our own warnings (`ImatrixWarning`) printed as one `imatrix: warning:` line each, wherever a sub-command
    does not report them itself."""
    from imatrix.cli.common import console_reporter

    return console_reporter().warnings_reported()


def run() -> None:
    """The `imatrix` command: `main`, then an exit that skips tearing the interpreter down, which takes ~0.8 s
    once torch and transformers are loaded (benchmarks/collect_speed.py times whole processes). Everything is
    written, closed and flushed by then; worker processes and ranks have ended."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
