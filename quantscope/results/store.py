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
import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from quantscope.errors import QuantscopeError
from quantscope.results.db import (DB_NAME, LOCK_NAME, SCHEMA, SCHEMA_VERSION,  # noqa: F401
                                   check_database, corrupt_error, now, read_items, read_meta)
from quantscope.results.record import Record, upgrade

def _check_same(run_dir: Path, stored: dict, meta: dict, same: tuple[str, ...]) -> None:
    differ = [k for k in same if k in stored and k in meta and stored[k] != meta[k]]
    if not differ:
        return

    def show(d: dict) -> str:
        return ", ".join(f"{k} {d[k]!r}" for k in differ)

    held = f"model {stored.get('model')!r}, text {stored.get('text')!r}"
    asked = f"model {meta.get('model')!r}, text {meta.get('text')!r}"
    raise QuantscopeError(f"run directory {run_dir} holds {held} ({show(stored)}), this run asks for {asked} "
                          f"({show(meta)}): give a new --out")


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
    def open(cls, run_dir: str | os.PathLike, meta: dict[str, Any] | None = None, wait_seconds: float = 0.0,
             same: tuple[str, ...] = ()) -> "RunStore":
        """Open (creating if needed) the run directory for writing.

        `meta` is merged into the stored metadata (new keys and values win; `created` is kept).
        `same` names the metadata a run directory belongs to (its model, its text): a stored value that
        differs from `meta`'s is refused before anything is written.
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
            stored = read_meta(conn, run_dir / DB_NAME)
            _check_same(run_dir, stored, meta or {}, same)
            merged = {**stored, **(meta or {})}
            merged.setdefault("name", run_dir.name)
            merged["created"] = stored.get("created", now())
            from quantscope.measure.machine import machine_info

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
        return None if row is None else upgrade(json.loads(row[0]))

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
                (key, text, now()),
            )

    def items(self) -> list[tuple[str, Record]]:
        """(key, record) pairs in insertion order."""
        return read_items(self._require_open(), self.db_path)

    def records(self) -> list[Record]:
        """Records in insertion order."""
        return [upgrade(record) for _, record in self.items()]

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
        raise corrupt_error(db_path, str(e)) from e
    try:
        check_database(conn, db_path)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed record survives power loss too, not only a killed process.
        conn.execute("PRAGMA synchronous=FULL")
        # Tables and schema version in one transaction: a kill here leaves an empty file or a whole store.
        conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise corrupt_error(db_path, str(e)) from e
    except BaseException:
        conn.close()
        raise
    return conn
