"""Reading run directories back: one run, every run under a root, a run named by path or name.

Read-only (no lock taken), so `quantscope show` and `runs` work while a sweep writes.
"""

from __future__ import annotations

import difflib
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantscope.errors import QuantscopeError
from quantscope.results.record import Record, upgrade
from quantscope.results.db import DB_NAME, DEFAULT_RUNS_ROOT, check_database, corrupt_error, read_items, read_meta



@dataclass(frozen=True)
class Run:
    """A run as read back from disk (no lock taken; safe while a sweep is writing)."""

    name: str
    path: Path
    meta: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run directory's metadata and records without writing to it."""
    run_dir = Path(run_dir)
    db_path = run_dir / DB_NAME
    if not db_path.is_file():
        raise QuantscopeError(f"no quantscope run at {run_dir} (missing {DB_NAME})")
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise corrupt_error(db_path, str(e)) from e
    try:
        if "records" not in check_database(conn, db_path):  # a writer is creating it right now
            return Run(name=run_dir.name, path=run_dir, meta={})
        meta = read_meta(conn, db_path)
        items = read_items(conn, db_path)
    finally:
        conn.close()
    return Run(
        name=meta.get("name", run_dir.name),
        path=run_dir,
        meta=meta,
        records=[upgrade(r) for _, r in items],
        keys=[k for k, _ in items],
    )


def _models_of(run: Run) -> str | None:
    models = list(dict.fromkeys(str(r["model"]) for r in run.records if r.get("model") is not None))
    if not models and run.meta.get("model") is not None:
        models = [str(run.meta["model"])]
    return ", ".join(models) if models else None


def list_runs(root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> list[dict[str, Any]]:
    """One row per run directory under `root`, oldest first: name, path, records, created, model.

    A run that cannot be read is listed with an `error` instead of hiding it or failing the listing.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    rows = []
    for run_dir in sorted(p for p in root.iterdir() if (p / DB_NAME).is_file()):
        try:
            run = load_run(run_dir)
        except QuantscopeError as e:
            rows.append({"name": run_dir.name, "path": str(run_dir), "records": None,
                         "created": None, "model": None, "error": str(e)})
            continue
        rows.append({
            "name": run_dir.name,
            "path": str(run_dir),
            "records": len(run.records),
            "created": run.meta.get("created"),
            "model": _models_of(run),
        })
    rows.sort(key=lambda r: (r["created"] or "", r["name"]))
    return rows


def resolve_run(ref: str | os.PathLike, root: str | os.PathLike = DEFAULT_RUNS_ROOT) -> Path:
    """A run given by path or by name under `root`; unknown names get a "did you mean" hint."""
    as_path = Path(ref)
    if (as_path / DB_NAME).is_file():
        return as_path
    under_root = Path(root) / str(ref)
    if (under_root / DB_NAME).is_file():
        return under_root
    names = [r["name"] for r in list_runs(root)]
    close = difflib.get_close_matches(str(ref), names, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else (
        f" (runs under {root}: {', '.join(names)})" if names else f" (no runs under {root})")
    raise QuantscopeError(f"unknown run '{ref}'{hint}")
