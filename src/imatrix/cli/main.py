"""`imatrix`: llama-imatrix's flags by default, plus subcommands. Parsing only; the work is in the library."""

from __future__ import annotations

import importlib
import sys

from imatrix.errors import ImatrixError

# subcommand -> module under imatrix.cli exposing `main(argv: list[str]) -> int`
SUBCOMMANDS = {
    "quantize": "quantize",
    "perplexity": "perplexity",
    "report": "report",
    "compare": "compare",
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    module_name = SUBCOMMANDS.get(args[0]) if args else None
    try:
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


if __name__ == "__main__":
    sys.exit(main())
