"""Files written so that a reader never sees half of one, and content hashes.

The lowest floor with `errors`: imported by the store, the sensitivity cache, the CLI's `--json`
output and the model loader alike, so there is one atomic writer and one file hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where quantscope caches what it builds (dequantized models, sensitivity scans, CPU kernels)."""
    return Path(os.environ.get("QUANTSCOPE_CACHE", Path.home() / ".cache" / "quantscope"))


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


def partial_path(target: str | os.PathLike) -> Path:
    """Where a large output (a checkpoint folder, a model file) is assembled before its one rename into
    `target`: a hidden sibling named for this process, so a later run can tell a dead one's leftovers."""
    target = Path(target)
    return target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def remove_stale_partials(target: str | os.PathLike) -> list[tuple[str, int]]:
    """Remove the partial outputs of `target` (see `partial_path`) whose process is gone — a save killed
    with -9 cannot clean up after itself — and return (name, bytes) of each. A partial of a process
    that still runs is another save in progress and is left alone."""
    import shutil

    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.partial-(\d+)-[0-9a-f]+$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in sorted(target.parent.iterdir()):
        m = pattern.match(p.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        size = _size(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            removed.append((p.name, size))
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
