"""JSON Lines, read one way for every evaluation input: a value per line, blank lines skipped.

Errors are one line naming the file and the line (``data.jsonl:3: invalid JSON (...)``). What a
line must hold (an object, a ``text`` field ...) is the caller's to check: the reader only parses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from quantscope.errors import QuantscopeError


def require_file(path: Path) -> None:
    if not path.is_file():
        raise QuantscopeError(f"{path}: no such file")


def parse_jsonl(lines: Iterable[str], where: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of `lines`; `where` names the source in errors."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantscopeError(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
        yield lineno, value


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of the UTF-8 file `path`."""
    require_file(path)
    with open(path, encoding="utf-8") as f:
        yield from parse_jsonl(f, str(path))
