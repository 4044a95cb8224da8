"""`Reporter`: the one way the library says anything. It prints nothing itself: the caller gives it the
sinks (the CLI gives stdout, stderr and a tqdm bar, `imatrix.cli.console`); without them it is silent.

What goes where follows llama.cpp's tools: results (`[1]12.3456,` and the final estimate, llama.cpp's
level-0 `LOG`) on the output sink; warnings and progress lines on the message sink, filtered by
llama.cpp's `-lv` levels (common/log.h: warnings from 2, information from 3); the progress bar with
the information lines.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from imatrix.errors import ImatrixWarning

# llama.cpp's log levels (common/log.h): a line shows when its level is at most the verbosity
OUTPUT, ERROR, WARN, INFO = 0, 1, 2, 3


class ProgressBar(Protocol):
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Reporter:
    """Where results, messages and progress go. Every sink is optional (None: dropped)."""

    verbosity: int = INFO  # as llama.cpp's -lv: 0 or 1 results only, 2 warnings too, 3 information too
    output: Callable[[str], None] | None = None  # stdout text, written as given (no newline added)
    messages: Callable[[str], None] | None = None  # stderr, one line per call (without its newline)
    # a bar over `total` tokens titled `desc` (a tqdm); shown with the information lines
    progress_bar: Callable[[int, str], ProgressBar] | None = None

    def result(self, text: str) -> None:
        if self.output is not None:
            self.output(text)

    def log(self, line: str, level: int = INFO) -> None:
        """A line at llama.cpp's `level`: shown if the verbosity is at least that."""
        if self.messages is not None and self.verbosity >= level:
            self.messages(line)

    def info(self, line: str) -> None:
        self.log(line, INFO)

    def warning(self, text: str) -> None:
        """One of our own warnings (`imatrix: warning: ...`): shown at every verbosity, as errors are."""
        self.log(f"imatrix: warning: {text}", OUTPUT)

    @contextlib.contextmanager
    def progress(self, total: int, desc: str | None) -> Iterator[ProgressBar]:
        """A progress bar titled `desc` (None: none), closed when the block ends (on an error or Ctrl-C too,
        before its line)."""
        shown = (desc is not None and self.progress_bar is not None and self.messages is not None
                 and self.verbosity >= INFO)
        bar = self.progress_bar(total, desc) if shown else _NoBar()
        try:
            yield bar
        finally:
            bar.close()

    def silent(self) -> Reporter:
        """A reporter that drops everything (ranks other than 0 under torch.distributed)."""
        return replace(self, output=None, messages=None, progress_bar=None)

    @contextlib.contextmanager
    def warnings_reported(self, category: type[Warning] = ImatrixWarning, every_time: bool = False) -> Iterator[None]:
        """`warnings.warn` of `category` inside the block become `warning` lines (other warnings go where
        they went); with `every_time`, a warning repeated at the same place is reported each time."""
        with warnings.catch_warnings():
            if every_time:
                warnings.simplefilter("always")
            shown_before = warnings.showwarning

            def show(message: Warning | str, kind: type[Warning], *args: object, **kwargs: object) -> None:
                if issubclass(kind, category):
                    self.warning(str(message))
                else:
                    shown_before(message, kind, *args, **kwargs)

            warnings.showwarning = show  # type: ignore[assignment]
            yield


SILENT = Reporter()
