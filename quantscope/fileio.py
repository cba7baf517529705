"""Files written so that a reader never sees half of one, and content hashes.

The lowest floor with `errors`: imported by the store, the sensitivity cache, the CLI's `--json`
output and the model loader alike, so there is one atomic writer and one file hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text through a temp file in the same folder and a rename: a reader (or a killed run)
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (see write_text_atomic)."""
    write_text_atomic(path, to_json(obj))


def emit_json(dest: str, obj: Any) -> None:
    """The one meaning of `--json DEST` on every command: '-' prints to stdout, anything else is a file
    written atomically."""
    if dest == "-":
        sys.stdout.write(to_json(obj))
        sys.stdout.flush()
    else:
        write_json_atomic(dest, obj)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
