"""A SQLite store of results, shared by the CLI (``--db``) and the dashboard.

One row per result: the columns the dashboard filters and sorts on (indexed) next to the
full result JSON. WAL mode lets readers (the dashboard) keep reading while a benchmark
writes; every write is one transaction. Each call opens its own short-lived connection,
so a Store can be shared by threads and processes without sharing a sqlite3 connection.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Iterable, Iterator

from .results import Result, ResultFormatError, decode_results

DEFAULT_PATH = os.path.join("data", "runs.sqlite")
DB_VERSION = 1
BUSY_TIMEOUT_S = 30.0

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    sweep_id TEXT,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_created_at ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, created_at);
CREATE INDEX IF NOT EXISTS runs_model ON runs (model, created_at);
CREATE INDEX IF NOT EXISTS runs_sweep_id ON runs (sweep_id, created_at);
"""


class StoreError(RuntimeError):
    """The database file cannot be used (not SQLite, damaged, newer format, unwritable, its
    disk full); names the path and why."""


def _decode_row(row_id: str, text: str) -> Result | tuple[str, str]:
    try:
        return Result.from_dict(json.loads(text), f"stored run {row_id}")
    except (ResultFormatError, ValueError, RecursionError) as exc:
        return row_id, str(exc)


def default_path() -> str:
    """$TRADEOFF_LAB_DB, else data/runs.sqlite (relative to the working directory)."""
    return os.environ.get("TRADEOFF_LAB_DB") or DEFAULT_PATH


class Store:
    """Results in SQLite, newest first. Safe across threads and processes."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else default_path()
        if not self.path:
            raise StoreError("the results database path is empty; give a file, e.g. data/runs.sqlite")
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the results database ({exc.strerror or exc})") from None
        with self._connect("cannot open the results database") as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > DB_VERSION:
                raise StoreError(f"{self.path}: database format {version} is newer than this version reads ({DB_VERSION})")
            if version < DB_VERSION:
                # A new file: set it up once. Opening an existing store writes nothing, so a
                # full disk fails when a run is stored, never when runs are listed.
                # WAL is a property of the database file: every later connection uses it.
                conn.execute("PRAGMA journal_mode=WAL")
                with conn:
                    conn.executescript(_SCHEMA_SQL)
                    conn.execute(f"PRAGMA user_version = {DB_VERSION}")

    @contextlib.contextmanager
    def _connect(self, doing: str = "cannot read the results database") -> Iterator[sqlite3.Connection]:
        """A short-lived connection; any SQLite failure (damaged pages, a full disk, a
        read-only file) becomes a StoreError that names the file, what failed and why."""
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {doing} ({exc})") from None
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {doing} ({exc})") from None
        finally:
            conn.close()

    def check_writable(self) -> None:
        """Raise StoreError unless the database can take a run now: SQLite's quick_check
        passes (a damaged file fails before anything is measured, not after) and a write
        transaction can start and write (the file and its directory are writable)."""
        with self._connect("cannot check the results database") as conn:
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise StoreError(f"{self.path}: the results database is damaged (SQLite quick_check: {problem})")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # A write of what is already there, rolled back: SQLite refuses it on a
                # read-only file before touching anything.
                conn.execute(f"PRAGMA user_version = {DB_VERSION}")
            finally:
                conn.rollback()

    @staticmethod
    def _row(result: Result) -> tuple:
        return (result.id, result.created_at, result.status, result.config.model, result.sweep_id, result.to_json())

    def add(self, result: Result) -> bool:
        """Store one result; False if a result with its id is already stored."""
        added, _ = self.add_many([result])
        return added == 1

    def add_many(self, results: Iterable[Result]) -> tuple[int, int]:
        """Store results in one transaction; returns (added, skipped_duplicates)."""
        rows = [self._row(result) for result in results]
        with self._connect("cannot store the run(s)") as conn, conn:
            before = conn.total_changes
            # Only a duplicate id is skipped; any other constraint failure is an error, never
            # counted as "already stored".
            conn.executemany("INSERT INTO runs (id, created_at, status, model, sweep_id, json) VALUES (?, ?, ?, ?, ?, ?) "
                             "ON CONFLICT (id) DO NOTHING", rows)
            added = conn.total_changes - before
        return added, len(rows) - added

    def get(self, id: str) -> Result | None:
        """The result with this id, or None (also when its row is unreadable)."""
        found = self.list(ids=[id])
        return found[0] if found else None

    def list(self, model: str | None = None, status: str | None = None, sweep_id: str | None = None,
             ids: Iterable[str] | None = None, limit: int | None = None) -> list[Result]:
        """Results matching every given filter, newest first, at most ``limit``. Rows that do
        not read as a valid result are left out (``unreadable()`` lists them)."""
        return [result for result in self._rows(model, status, sweep_id, ids, limit) if isinstance(result, Result)]

    def unreadable(self) -> list[tuple[str, str]]:
        """(id, problem) of every stored row that is not a valid result (written by another
        version, or damaged): pages show these as unreadable so they can be deleted."""
        return [row for row in self._rows() if not isinstance(row, Result)]

    def _rows(self, model=None, status=None, sweep_id=None, ids=None, limit=None) -> list:
        """Matching rows, each a Result or an (id, problem) pair."""
        where, params = [], []
        for column, value in (("model", model), ("status", status), ("sweep_id", sweep_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if ids is not None:
            ids = list(ids)
            if not ids:
                return []
            # json_each keeps one bound parameter however many ids are asked for.
            where.append("id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(ids))
        sql = "SELECT id, json FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._connect() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_decode_row(row_id, text) for row_id, text in rows]

    def latest_sweep_id(self) -> str | None:
        """The sweep id of the newest result that belongs to a sweep, or None."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT sweep_id FROM runs WHERE sweep_id IS NOT NULL ORDER BY created_at DESC, rowid DESC LIMIT 1"
            ).fetchone()
        return row[0] if row else None

    def delete(self, ids: Iterable[str]) -> int:
        """Delete results by id in one transaction; returns how many were deleted."""
        ids = list(ids)
        with self._connect("cannot delete from the results database") as conn, conn:
            cursor = conn.execute("DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))
        return cursor.rowcount

    def count(self) -> int:
        """Number of stored results."""
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


# --------------------------------------------------------------------------- importing
@dataclass(frozen=True)
class ImportOutcome:
    """What importing one file did: runs added, duplicates skipped (same id), or why nothing
    was imported (``error``); ``notes`` say what the reader skipped (a torn last line)."""

    name: str
    added: int = 0
    skipped: int = 0
    error: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the file was accepted (possibly adding nothing new)."""
        return self.error is None

    def message(self) -> str:
        """One sentence (plus the reader's notes) for a person."""
        if self.error:
            text = f"{self.error} — nothing from {self.name} was imported."
        else:
            text = f"{self.name}: imported {self.added} run(s), skipped {self.skipped} already stored (same id)."
        return " ".join([text, *(f"Note: {note}." for note in self.notes)])


def import_bundle(store: Store, name: str, data: bytes, origin: str = "imported") -> ImportOutcome:
    """Import the results file ``data`` (named ``name`` in messages) into ``store``: the whole
    file is validated first (``decode_results``), so a bad file imports nothing; then every
    result is added in one transaction, recorded with ``origin`` ("imported", or "demo" for
    the demo data): runs measured elsewhere never pass for this machine's. Demo runs stay
    demo whoever imports them. Raises StoreError only if the database cannot take the write."""
    try:
        results = decode_results(data, name)
    except ResultFormatError as exc:
        return ImportOutcome(name, error=str(exc))
    if not results:
        return ImportOutcome(name, error=f"{name}: the file holds no results", notes=results.notes)
    added, skipped = store.add_many(r if r.origin == "demo" else r.replace(origin=origin) for r in results)
    return ImportOutcome(name, added, skipped, notes=results.notes)
