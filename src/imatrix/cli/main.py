"""`imatrix`: llama-imatrix's flags by default, plus subcommands. Parsing only; the work is in the library."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from imatrix.errors import ImatrixError, ImatrixWarning

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


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Our own warnings (`ImatrixWarning`) printed as one `imatrix: warning:` line each."""
    with warnings.catch_warnings():
        shown_before = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
            if issubclass(category, ImatrixWarning):
                print(f"imatrix: warning: {message}", file=sys.stderr)
            else:
                shown_before(message, category, *args, **kwargs)

        warnings.showwarning = show  # type: ignore[assignment]
        yield


if __name__ == "__main__":
    sys.exit(main())
