"""What every `imatrix` subcommand's parser shares."""

from __future__ import annotations

import argparse

from imatrix.errors import ImatrixError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line like any other bad input: one line, exit code 1."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ImatrixError(message)
