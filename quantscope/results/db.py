"""The SQLite file of a run directory: its schema, and reading it with a clear error when it is not ours."""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import sqlite3
from pathlib import Path
from typing import Any

from quantscope.errors import QuantscopeError

DB_NAME = "results.sqlite"
LOCK_NAME = ".lock"
DEFAULT_RUNS_ROOT = Path("quantscope-runs")
# Stored in PRAGMA user_version; a database with tables but another version is not ours.
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    key     TEXT NOT NULL UNIQUE,
    record  TEXT NOT NULL,
    created TEXT NOT NULL
);
"""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def corrupt_error(db_path: Path, detail: str) -> QuantscopeError:
    aside = db_path.with_name(db_path.name + ".corrupt")
    return QuantscopeError(
        f"{db_path} is not a readable quantscope result store ({detail}); "
        f"move it aside or delete it: mv {shlex.quote(str(db_path))} {shlex.quote(str(aside))}"
    )


def check_database(conn: sqlite3.Connection, db_path: Path) -> set[str]:
    """Raise a clear QuantscopeError unless `conn` is a healthy quantscope store (or an empty file).

    Returns the names of its tables (empty for a file a writer has only just created)."""
    try:
        row = conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise corrupt_error(db_path, f"integrity check: {row[0] if row else 'no answer'}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise corrupt_error(db_path, str(e)) from e
    if tables - {"sqlite_sequence"} and (version != SCHEMA_VERSION or not {"meta", "records"} <= tables):
        raise corrupt_error(db_path, f"an SQLite file with other tables {sorted(tables)}, schema {version}")
    return tables


def read_meta(conn: sqlite3.Connection, db_path: Path) -> dict[str, Any]:
    try:
        return {name: json.loads(value) for name, value in conn.execute("SELECT name, value FROM meta")}
    except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
        raise corrupt_error(db_path, str(e)) from e


def read_items(conn: sqlite3.Connection, db_path: Path) -> list[tuple[str, dict]]:
    try:
        rows = conn.execute("SELECT key, record FROM records ORDER BY seq").fetchall()
        return [(key, json.loads(text)) for key, text in rows]
    except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
        raise corrupt_error(db_path, str(e)) from e
