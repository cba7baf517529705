"""The one exception type for bad user input: the CLI prints its message as one line and exits 2."""


class QuantscopeError(Exception):
    """A user-facing error: bad input, unknown format, missing file, a budget nothing meets."""


def one_line(message: object) -> str:
    """`message` as one line: a library's multi-line text (a validation error, a wrapped traceback
    excerpt) joined with spaces, so the CLI's promise of one line holds whatever was wrapped."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())
