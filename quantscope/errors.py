"""The one exception type for bad user input: the CLI prints its message as one line and exits 2."""


class QuantscopeError(Exception):
    """A user-facing error: bad input, unknown format, missing file, a budget nothing meets."""
