"""The one exception type that reaches the user as a single line."""


class ImatrixError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits 1."""


class ImatrixWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one line."""


SHOWN_NAME_CHARS = 80


def shown(name: str | bytes) -> str:
    """A name read from a file as an error message prints it: escaped (no terminal control codes), cut short."""
    text = repr(name if isinstance(name, str) else name.decode("utf-8", errors="replace"))
    return text if len(text) <= SHOWN_NAME_CHARS else text[: SHOWN_NAME_CHARS - 4] + "...'"
