"""The result store: one SQLite database per run directory, so a long comparison survives being killed.

Layout of a run directory (`quantscope-runs/<name>/` by default)::

    results.sqlite   records (JSON text, keyed by `record_key`) and the run's metadata
    .lock            held with an exclusive flock by the one process writing the run

Why SQLite (stdlib `sqlite3`) rather than a JSON file per record: one transaction per record gives
atomicity for free (a `kill -9` loses at most the record in flight, never leaves half a record),
WAL mode lets `quantscope show` read while a sweep writes, and a UNIQUE key makes "measured twice"
impossible rather than merely unlikely. The lock file exists because SQLite's own locking only
serialises transactions; two sweeps interleaving on one run directory would each measure what the
other is about to measure, so the second writer is refused with a message naming the first's pid.

A database that SQLite cannot read is reported with a way out, never silently replaced: the records
in it may have cost hours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import difflib
import fcntl
import hashlib
import json
import os
import platform
import shlex
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from quantscope.errors import QuantscopeError
from quantscope.results import Record

DB_NAME = "results.sqlite"
LOCK_NAME = ".lock"
DEFAULT_RUNS_ROOT = Path("quantscope-runs")
# Stored in PRAGMA user_version; a database with tables but another version is not ours.
SCHEMA_VERSION = 1

_SCHEMA = """
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


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings (tuples = lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _spec_to_jsonable(spec: Any) -> Any:
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return {"__type__": type(spec).__name__, **dataclasses.asdict(spec)}
    return spec


def record_key(model_fingerprint: str, format_spec: Any, eval_spec: dict, version: str) -> str:
    """Stable identity of one measurement: sha256 of the canonical JSON of everything that defines it.

    `format_spec` is a format name or a FormatSpec dataclass; `eval_spec` holds the text hash, ctx,
    windows, tasks and any other knob that changes the numbers. Keys do not depend on dict order.
    """
    try:
        payload = canonical_json(
            {
                "model": model_fingerprint,
                "format": _spec_to_jsonable(format_spec),
                "eval": eval_spec,
                "version": version,
            }
        )
    except (TypeError, ValueError) as e:
        raise QuantscopeError(f"cannot build a record key: the evaluation spec is not plain JSON ({e})") from e
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def machine_info() -> dict[str, Any]:
    """Where a run was measured (goes into the run's provenance)."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _corrupt_error(db_path: Path, detail: str) -> QuantscopeError:
    aside = db_path.with_name(db_path.name + ".corrupt")
    return QuantscopeError(
        f"{db_path} is not a readable quantscope result store ({detail}); "
        f"move it aside or delete it: mv {shlex.quote(str(db_path))} {shlex.quote(str(aside))}"
    )


def _check_database(conn: sqlite3.Connection, db_path: Path) -> set[str]:
    """Raise a clear QuantscopeError unless `conn` is a healthy quantscope store (or an empty file).

    Returns the names of its tables (empty for a file a writer has only just created)."""
    try:
        row = conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise _corrupt_error(db_path, f"integrity check: {row[0] if row else 'no answer'}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise _corrupt_error(db_path, str(e)) from e
    if tables - {"sqlite_sequence"} and (version != SCHEMA_VERSION or not {"meta", "records"} <= tables):
        raise _corrupt_error(db_path, f"an SQLite file with other tables {sorted(tables)}, schema {version}")
    return tables


def _read_meta(conn: sqlite3.Connection, db_path: Path) -> dict[str, Any]:
    try:
        return {name: json.loads(value) for name, value in conn.execute("SELECT name, value FROM meta")}
    except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
        raise _corrupt_error(db_path, str(e)) from e


def _read_items(conn: sqlite3.Connection, db_path: Path) -> list[tuple[str, Record]]:
    try:
        rows = conn.execute("SELECT key, record FROM records ORDER BY seq").fetchall()
        return [(key, json.loads(text)) for key, text in rows]
    except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
        raise _corrupt_error(db_path, str(e)) from e


class RunStore:
    """The writable store of one run directory. Use `RunStore.open(...)`, ideally as a context manager.

    Holds the run directory's lock until `close()`; every `put` is its own committed transaction.
    """

    def __init__(self, run_dir: Path, conn: sqlite3.Connection, lock_fd: int, meta: dict[str, Any]):
        self.run_dir = run_dir
        self.db_path = run_dir / DB_NAME
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd: int | None = lock_fd
        self._meta = meta

    @classmethod
    def open(cls, run_dir: str | os.PathLike, meta: dict[str, Any] | None = None, wait_seconds: float = 0.0) -> "RunStore":
        """Open (creating if needed) the run directory for writing.

        `meta` is merged into the stored metadata (new keys and values win; `created` is kept).
        If another process holds the run directory, wait up to `wait_seconds`, then refuse.
        """
        run_dir = Path(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QuantscopeError(f"cannot create run directory {run_dir}: {e.strerror}") from e
        if not run_dir.is_dir():
            raise QuantscopeError(f"run directory {run_dir} is not a directory")
        lock_fd = _acquire_lock(run_dir, wait_seconds)
        conn = None
        try:
            conn = _connect_writable(run_dir / DB_NAME)
            stored = _read_meta(conn, run_dir / DB_NAME)
            merged = {**stored, **(meta or {})}
            merged.setdefault("name", run_dir.name)
            merged["created"] = stored.get("created", _now())
            merged.setdefault("machine", machine_info())
            store = cls(run_dir, conn, lock_fd, stored)
            store.update_meta(merged)
            return store
        except BaseException:
            if conn is not None:
                conn.close()
            os.close(lock_fd)
            raise

    # --- metadata -------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def update_meta(self, values: dict[str, Any]) -> None:
        """Store (or replace) metadata entries, e.g. `recommendation` or `sensitivity`, in one transaction."""
        conn = self._require_open()
        try:
            rows = [(k, json.dumps(v, allow_nan=True)) for k, v in values.items()]
        except (TypeError, ValueError) as e:
            raise QuantscopeError(f"run metadata is not plain JSON: {e}") from e
        with _transaction(conn):
            conn.executemany(
                "INSERT INTO meta(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                rows,
            )
        self._meta.update(values)

    # --- records --------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        conn = self._require_open()
        return conn.execute("SELECT 1 FROM records WHERE key=?", (key,)).fetchone() is not None

    def get(self, key: str) -> Record | None:
        conn = self._require_open()
        row = conn.execute("SELECT record FROM records WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, record: Record) -> None:
        """Commit one record. Re-putting a key replaces its record and keeps its position."""
        conn = self._require_open()
        try:
            text = json.dumps(record, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise QuantscopeError(f"record for format {record.get('format')!r} is not plain JSON: {e}") from e
        with _transaction(conn):
            conn.execute(
                "INSERT INTO records(key, record, created) VALUES(?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET record=excluded.record",
                (key, text, _now()),
            )

    def items(self) -> list[tuple[str, Record]]:
        """(key, record) pairs in insertion order."""
        return _read_items(self._require_open(), self.db_path)

    def records(self) -> list[Record]:
        """Records in insertion order."""
        return [record for _, record in self.items()]

    # --- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"RunStore for {self.run_dir} is closed")
        return self._conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _acquire_lock(run_dir: Path, wait_seconds: float) -> int:
    lock_path = run_dir / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise QuantscopeError(
                    f"run dir {run_dir} is in use by pid {holder}; wait for it to finish or use another --out"
                ) from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _connect_writable(db_path: Path) -> sqlite3.Connection:
    try:
        # Autocommit mode: transactions are explicit (`_transaction`), one per record.
        conn = sqlite3.connect(db_path, isolation_level=None)
    except sqlite3.Error as e:
        raise _corrupt_error(db_path, str(e)) from e
    try:
        _check_database(conn, db_path)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed record survives power loss too, not only a killed process.
        conn.execute("PRAGMA synchronous=FULL")
        # Tables and schema version in one transaction: a kill here leaves an empty file or a whole store.
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise _corrupt_error(db_path, str(e)) from e
    except BaseException:
        conn.close()
        raise
    return conn


# --- read-only access ---------------------------------------------------------------------------


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
        raise _corrupt_error(db_path, str(e)) from e
    try:
        if "records" not in _check_database(conn, db_path):  # a writer is creating it right now
            return Run(name=run_dir.name, path=run_dir, meta={})
        meta = _read_meta(conn, db_path)
        items = _read_items(conn, db_path)
    finally:
        conn.close()
    return Run(
        name=meta.get("name", run_dir.name),
        path=run_dir,
        meta=meta,
        records=[r for _, r in items],
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
