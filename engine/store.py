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
from typing import Iterable, Iterator

from .results import Result, ResultFormatError

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
    """The database file cannot be used (not SQLite, newer format, unwritable); names the path."""


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
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            with self._connect() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > DB_VERSION:
                    raise StoreError(f"{self.path}: database format {version} is newer than this version reads ({DB_VERSION})")
                # WAL is a property of the database file: set once, every later connection uses it.
                conn.execute("PRAGMA journal_mode=WAL")
                with conn:
                    conn.executescript(_SCHEMA_SQL)
                    conn.execute(f"PRAGMA user_version = {DB_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.path}: cannot open the results database ({exc})") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        try:
            yield conn
        finally:
            conn.close()

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
        with self._connect() as conn, conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO runs (id, created_at, status, model, sweep_id, json) VALUES (?, ?, ?, ?, ?, ?)", rows)
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
        with self._connect() as conn, conn:
            cursor = conn.execute("DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))
        return cursor.rowcount

    def count(self) -> int:
        """Number of stored results."""
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
