"""The one exception type that reaches the user as a single line."""


class ImatrixError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits 1."""
