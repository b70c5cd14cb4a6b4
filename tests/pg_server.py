"""A throw-away PostgreSQL server for the store's tests (and bench/store_backends.py).

``pg_server`` (session-scoped) starts Debian's PostgreSQL (15 on bookworm) on a free 127.0.0.1 port with a
temporary data directory, password login over TCP (so tests see a URL with a password, as a
team's would be), and stops it and removes the directory at the end. ``pg_database`` gives
each test its own new database on it, dropped after the test.

Skipped where PostgreSQL or psycopg is missing, unless TRADEOFF_LAB_REQUIRE_POSTGRES=1 (CI),
where a missing server is a failure. As root the server runs as ``nobody``: PostgreSQL
refuses to run as root.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

# Debian's server binaries (15 on bookworm); the newest installed major version wins.
PG_BIN = os.environ.get("TRADEOFF_LAB_PG_BIN") or max(
    glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]), default="/usr/lib/postgresql/15/bin")
USER = "tradeoff"
PASSWORD = "s3cret-Pw"  # what every message must leave out
START_TIMEOUT_S = 60
# Durability off for tests only: a crash loses a throw-away server anyway, and fsyncs would
# make each per-test database cost seconds on a loaded CI disk.
FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


def missing() -> str | None:
    """Why no server can be started here, or None."""
    if not os.path.exists(os.path.join(PG_BIN, "pg_ctl")):
        return f"PostgreSQL is not installed ({PG_BIN}/pg_ctl is missing; apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]>=3.2')"
    return None


def need_postgres() -> None:
    """Skip the calling test where PostgreSQL is missing, or fail where CI requires it."""
    why = missing()
    if why is None:
        return
    if os.environ.get("TRADEOFF_LAB_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{why}, and TRADEOFF_LAB_REQUIRE_POSTGRES=1 requires the PostgreSQL tests")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    """A running server: ``url(dbname)`` is a URL with the password, as a user would give it."""

    host: str
    port: int

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@{self.host}:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (connections still open to it are closed)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


@contextlib.contextmanager
def running_server(durable: bool = False) -> Iterator[Server]:
    """Start a server (with fsync and synchronous commit unless ``durable``), yield it, stop
    it and delete its files."""
    root = tempfile.mkdtemp(prefix="tradeoff-lab-pg-")
    run_as = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    data, log, pwfile = (os.path.join(root, name) for name in ("data", "server.log", "password"))
    with open(pwfile, "w") as f:
        f.write(PASSWORD)
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    port = _free_port()

    def run(*args: str) -> None:
        done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=START_TIMEOUT_S, **run_as)
        if done.returncode != 0:
            log_text = open(log).read() if os.path.exists(log) else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr or done.stdout}{log_text}")

    try:
        run(os.path.join(PG_BIN, "initdb"), "-D", data, "-U", USER, "--pwfile", pwfile, "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")
        options = ["-c", "listen_addresses=127.0.0.1", "-p", str(port), "-k", root, *(() if durable else FAST)]
        run(os.path.join(PG_BIN, "pg_ctl"), "-D", data, "-l", log, "-w", "-t", str(START_TIMEOUT_S),
            "-o", " ".join(options), "start")
        try:
            yield Server("127.0.0.1", port)
        finally:
            run(os.path.join(PG_BIN, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """One server for the whole test session (a start costs seconds)."""
    need_postgres()
    with running_server() as server:
        yield server


@pytest.fixture
def pg_database(pg_server: Server) -> Iterator[str]:
    """The URL (with its password) of a new, empty database of this test's own."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)
