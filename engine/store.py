"""The store of results, shared by the CLI (``--db``) and the dashboard: a SQLite file, or a
PostgreSQL database (a ``postgresql://`` URL) that a team shares.

One row per result: the columns the dashboard filters and sorts on (indexed) next to the
full result JSON, as stored text (never re-encoded, so the stored JSON is exactly the
result's). The table is declared once (``COLUMNS``, ``INDEXES``) and each backend's SQL is
generated from that declaration; the backends differ only in how they connect, mark the
format version, keep insertion order and check that a write can happen.

Every call opens its own short-lived connection and is one transaction: a Store can be
shared by threads, processes and dashboard sessions without sharing a connection, and a
server that restarts, or a connection that breaks, costs one failed call, never a stuck
pool. SQLite runs in WAL mode so readers (the dashboard) keep reading while a benchmark
writes. psycopg is imported only for a PostgreSQL URL.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .results import Result, ResultFormatError, decode_results

DEFAULT_PATH = os.path.join("data", "runs.sqlite")
DB_VERSION = 1
BUSY_TIMEOUT_S = 30.0
# An unreachable server fails a page or a command after this long instead of hanging it.
CONNECT_TIMEOUT_S = 10
URL_SCHEMES = ("postgresql://", "postgres://")
PSYCOPG_REQUIREMENT = "psycopg[binary]>=3.2"


class StoreError(RuntimeError):
    """The database cannot be used (not SQLite, damaged, newer format, unwritable, its disk
    full, its server unreachable or refusing the login); names the database (never its
    password) and why."""


# --------------------------------------------------------------------------- the table, once
@dataclass(frozen=True)
class Column:
    """One column of the runs table: its name, whether it may be NULL, and its value in a
    result. Every column is text; the json column holds the result exactly as serialised."""

    name: str
    value: Callable[[Result], object]
    nullable: bool = False


TABLE = "runs"
KEY = "id"
COLUMNS = (
    Column("id", lambda r: r.id),
    Column("created_at", lambda r: r.created_at),
    Column("status", lambda r: r.status),
    Column("model", lambda r: r.config.model),
    Column("sweep_id", lambda r: r.sweep_id, nullable=True),
    Column("json", lambda r: r.to_json()),
)
# The filters the pages use, each with the newest-first order they list in.
INDEXES = {
    "runs_created_at": ("created_at",),
    "runs_status": ("status", "created_at"),
    "runs_model": ("model", "created_at"),
    "runs_sweep_id": ("sweep_id", "created_at"),
}
COLUMN_NAMES = tuple(column.name for column in COLUMNS)


def is_url(target: str) -> bool:
    """Whether ``target`` names a PostgreSQL server (``postgresql://…``) rather than a SQLite file."""
    return target.startswith(URL_SCHEMES)


def display_name(target: str) -> str:
    """``target`` as messages show it: a file path as given; a URL without its password
    (whether in the user part or a ``password=`` parameter)."""
    if not is_url(target):
        return target
    parts = urllib.parse.urlsplit(target)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = userinfo.partition(":")[0] + "@" + hosts
    query = parts.query
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(key == "password" for key, _ in pairs):
        query = urllib.parse.urlencode([(k, v) for k, v in pairs if k != "password"], safe="/:,")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def default_path() -> str:
    """$TRADEOFF_LAB_DB, else data/runs.sqlite (relative to the working directory)."""
    return os.environ.get("TRADEOFF_LAB_DB") or DEFAULT_PATH


def _decode_row(row_id: str, text: str) -> Result | tuple[str, str]:
    try:
        return Result.from_dict(json.loads(text), f"stored run {row_id}")
    except (ResultFormatError, ValueError, RecursionError) as exc:
        return row_id, str(exc)


def _column_sql(column: Column, text_type: str) -> str:
    if column.name == KEY:
        return f"{column.name} {text_type} PRIMARY KEY"
    return f"{column.name} {text_type}" + ("" if column.nullable else " NOT NULL")


def schema_sql(text_type: str, extra_columns: tuple[str, ...] = ()) -> list[str]:
    """The statements that create the table and its indexes, with ``text_type`` for every
    column and a backend's ``extra_columns`` (PostgreSQL's insertion order)."""
    columns = [_column_sql(column, text_type) for column in COLUMNS] + list(extra_columns)
    statements = [f"CREATE TABLE IF NOT EXISTS {TABLE} (\n    " + ",\n    ".join(columns) + "\n)"]
    statements += [f"CREATE INDEX IF NOT EXISTS {name} ON {TABLE} ({', '.join(cols)})" for name, cols in INDEXES.items()]
    return statements


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------- the backends
class _SQLite:
    """A SQLite file. Insertion order is SQLite's implicit row id, so files written before
    PostgreSQL was supported keep their schema."""

    param = "?"
    order = "rowid"

    def __init__(self, path: str):
        self.name = path
        self._path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path}: cannot open the results database ({exc.strerror or exc})") from None

    @contextlib.contextmanager
    def connect(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A short-lived connection, one transaction (committed when the block ends, rolled
        back when it raises); any SQLite failure (damaged pages, a full disk, a read-only
        file) becomes a StoreError naming the file, what failed and why."""
        try:
            conn = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.name}: {doing} ({exc})") from None
        try:
            with conn:
                yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"{self.name}: {doing} ({exc})") from None
        finally:
            conn.close()

    @staticmethod
    def ids_condition(ids: list[str]) -> tuple[str, object]:
        # json_each keeps one bound parameter however many ids are asked for.
        return "id IN (SELECT value FROM json_each(?))", json.dumps(ids)

    @staticmethod
    def version(conn) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    @staticmethod
    def create(conn) -> None:
        # WAL is a property of the database file: every later connection uses it.
        conn.execute("PRAGMA journal_mode=WAL")
        # IMMEDIATE: two processes creating the same new file wait for each other.
        conn.executescript("BEGIN IMMEDIATE;\n" + ";\n".join(schema_sql("TEXT")) +
                           f";\nPRAGMA user_version = {DB_VERSION};\nCOMMIT;")

    def check_writable(self, conn, insert_sql: str) -> None:
        problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            raise StoreError(f"{self.name}: the results database is damaged (SQLite quick_check: {problem})")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # A write of what is already there, rolled back: SQLite refuses it on a
            # read-only file before touching anything.
            conn.execute(f"PRAGMA user_version = {DB_VERSION}")
        finally:
            conn.rollback()


class _Postgres:
    """A PostgreSQL database named by a ``postgresql://`` URL (libpq's syntax: user,
    password, hosts, port, database and parameters such as ``sslmode``). The password may
    also come from $PGPASSWORD or ~/.pgpass, as for psql.

    Text columns compare bytewise (``COLLATE "C"``) so ordering and equality are SQLite's
    whatever the server's locale; an identity column keeps insertion order (SQLite's row id);
    the format version lives in a one-row table."""

    param = "%s"
    order = "seq"
    VERSION_TABLE = "tradeoff_lab_version"
    # Any fixed number: concurrent first opens of one database take turns creating the table.
    SETUP_LOCK = 0x7472_6164_656F_6666  # "tradeoff"

    def __init__(self, url: str):
        self.name = display_name(url)
        try:
            import psycopg
        except ImportError:
            raise StoreError(f"{self.name}: a PostgreSQL database needs psycopg; install it with: "
                             f"python3 -m pip install '{PSYCOPG_REQUIREMENT}'") from None
        self._psycopg = psycopg
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(f"{self.name}: not a usable PostgreSQL URL ({_one_line(exc)})") from None
        self._password = params.get("password")
        self._url = url
        self._options = {"application_name": "tradeoff-lab", "connect_timeout": CONNECT_TIMEOUT_S}
        for key in params:
            self._options.pop(key, None)  # what the URL says wins

    def _problem(self, doing: str, exc: Exception) -> StoreError:
        text = _one_line(exc)
        if self._password:
            text = text.replace(self._password, "***")
        return StoreError(f"{self.name}: {doing} ({text})")

    @contextlib.contextmanager
    def connect(self, doing: str):
        """A new connection, one transaction (committed when the block ends, rolled back when
        it raises), closed after; any psycopg failure (server unreachable, login refused,
        a constraint, a read-only database) becomes a StoreError naming the database
        (without its password), what failed and why."""
        psycopg = self._psycopg
        try:
            # No prepared statements: they would break behind a pooler such as PgBouncer.
            conn = psycopg.connect(self._url, prepare_threshold=None, **self._options)
        except psycopg.Error as exc:
            raise self._problem(doing, exc) from None
        try:
            with conn:
                yield conn
        except psycopg.Error as exc:
            raise self._problem(doing, exc) from None

    @staticmethod
    def ids_condition(ids: list[str]) -> tuple[str, object]:
        return "id = ANY(%s)", ids

    def version(self, conn) -> int:
        # pg_tables, not to_regclass: a query sees a table another session just created,
        # while to_regclass may answer from this session's cached "no such table".
        if not conn.execute("SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = %s",
                            (self.VERSION_TABLE,)).fetchone():
            return 0
        return conn.execute(f"SELECT max(version) FROM {self.VERSION_TABLE}").fetchone()[0] or 0

    def create(self, conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.SETUP_LOCK,))
        if self.version(conn) >= DB_VERSION:
            return  # another process created it while this one waited
        for statement in schema_sql('TEXT COLLATE "C"', ("seq BIGINT GENERATED ALWAYS AS IDENTITY",)):
            conn.execute(statement)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {self.VERSION_TABLE} (version INTEGER NOT NULL)")
        conn.execute(f"INSERT INTO {self.VERSION_TABLE} (version) VALUES (%s)", (DB_VERSION,))

    def check_writable(self, conn, insert_sql: str) -> None:
        # A probe row, rolled back: the server refuses it when the user may not insert, the
        # database is read-only (a standby, default_transaction_read_only) or out of space.
        try:
            conn.execute(insert_sql, ("tradeoff-lab write check",) + ("",) * (len(COLUMNS) - 1))
        finally:
            conn.rollback()


def _backend(target: str) -> _SQLite | _Postgres:
    return _Postgres(target) if is_url(target) else _SQLite(target)


# --------------------------------------------------------------------------- the store
class Store:
    """Results in SQLite or PostgreSQL, newest first. Safe across threads and processes.

    ``path`` is how messages name the database: the file, or the URL without its password."""

    def __init__(self, path: str | os.PathLike | None = None):
        target = os.fspath(path) if path is not None else default_path()
        if not target:
            raise StoreError("the results database path is empty; give a file, e.g. data/runs.sqlite, "
                             "or a postgresql:// URL")
        self._backend = _backend(target)
        self.path = self._backend.name
        p = self._backend.param
        self._insert_sql = (f"INSERT INTO {TABLE} ({', '.join(COLUMN_NAMES)}) VALUES ({', '.join([p] * len(COLUMNS))}) "
                            f"ON CONFLICT ({KEY}) DO NOTHING")
        with self._backend.connect("cannot open the results database") as conn:
            version = self._backend.version(conn)
            if version > DB_VERSION:
                raise StoreError(f"{self.path}: database format {version} is newer than this version reads ({DB_VERSION})")
            if version < DB_VERSION:
                # A new database: set it up once. Opening an existing store writes nothing, so
                # a full disk fails when a run is stored, never when runs are listed.
                self._backend.create(conn)

    def check_writable(self) -> None:
        """Raise StoreError unless the database can take a run now: for SQLite, quick_check
        passes (a damaged file fails before anything is measured, not after) and a write
        transaction can start and write; for PostgreSQL, the server accepts an insert
        (then rolled back)."""
        with self._backend.connect("cannot check the results database") as conn:
            self._backend.check_writable(conn, self._insert_sql)

    @staticmethod
    def _row(result: Result) -> tuple:
        return tuple(column.value(result) for column in COLUMNS)

    def add(self, result: Result) -> bool:
        """Store one result; False if a result with its id is already stored."""
        added, _ = self.add_many([result])
        return added == 1

    def add_many(self, results: Iterable[Result]) -> tuple[int, int]:
        """Store results in one transaction; returns (added, skipped_duplicates)."""
        rows = [self._row(result) for result in results]
        if not rows:
            return 0, 0
        with self._backend.connect("cannot store the run(s)") as conn:
            cursor = conn.cursor()
            # Only a duplicate id is skipped; any other constraint failure is an error, never
            # counted as "already stored". rowcount sums the rows each insert added.
            cursor.executemany(self._insert_sql, rows)
            added = cursor.rowcount
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

    def _newest_first(self) -> str:
        return f" ORDER BY created_at DESC, {self._backend.order} DESC"

    def _rows(self, model=None, status=None, sweep_id=None, ids=None, limit=None) -> list:
        """Matching rows, each a Result or an (id, problem) pair."""
        p = self._backend.param
        where, params = [], []
        for column, value in (("model", model), ("status", status), ("sweep_id", sweep_id)):
            if value is not None:
                where.append(f"{column} = {p}")
                params.append(value)
        if ids is not None:
            ids = list(ids)
            if not ids:
                return []
            condition, value = self._backend.ids_condition(ids)
            where.append(condition)
            params.append(value)
        sql = f"SELECT id, json FROM {TABLE}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += self._newest_first()
        if limit is not None:
            sql += f" LIMIT {p}"
            params.append(int(limit))
        with self._backend.connect("cannot read the results database") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_decode_row(row_id, text) for row_id, text in rows]

    def latest_sweep_id(self) -> str | None:
        """The sweep id of the newest result that belongs to a sweep, or None."""
        with self._backend.connect("cannot read the results database") as conn:
            row = conn.execute(f"SELECT sweep_id FROM {TABLE} WHERE sweep_id IS NOT NULL"
                               f"{self._newest_first()} LIMIT 1").fetchone()
        return row[0] if row else None

    def delete(self, ids: Iterable[str]) -> int:
        """Delete results by id in one transaction; returns how many were deleted."""
        ids = list(ids)
        if not ids:
            return 0
        condition, value = self._backend.ids_condition(ids)
        with self._backend.connect("cannot delete from the results database") as conn:
            return conn.execute(f"DELETE FROM {TABLE} WHERE {condition}", (value,)).rowcount

    def count(self) -> int:
        """Number of stored results."""
        with self._backend.connect("cannot read the results database") as conn:
            return conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]


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
