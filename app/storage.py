"""Storage glue: the run store every session shares, one message when its database is
unusable, and the demo data set."""
from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Iterator

import streamlit as st

from engine.store import ImportOutcome, Store, StoreError, default_path, display_name, import_bundle, is_url

from . import ui

DEMO_DIR = Path(__file__).parent / "demo"


@st.cache_resource(show_spinner=False)
def _open_store(path: str | None) -> Store:
    return Store(path)


def get_store() -> Store:
    """The store at $TRADEOFF_LAB_DB (default data/runs.sqlite; a postgresql:// URL for a
    team's server), one per database per server process. It holds no connection: each call
    opens its own, so every session and background task can use it at once.

    Keyed by the variable's current value, so a test (or a second app) pointing at another
    database never gets a store opened for the first one. Raises StoreError when the database
    cannot be used; that is not cached, so once it is fixed the next page run opens it.
    """
    return _open_store(os.environ.get("TRADEOFF_LAB_DB"))


def database_problem(path: str, exc: Exception) -> str:
    """Which database and what is wrong with it: a StoreError says both; a bare SQLite error
    (damaged pages met by a query) gets the database's name."""
    return str(exc) if isinstance(exc, StoreError) else f"{display_name(path)}: the results database cannot be used ({exc})"


@contextlib.contextmanager
def database_errors_shown() -> Iterator[None]:
    """Around a page: an unusable results database (not SQLite, damaged, unreadable or
    read-only; a server that is down or refuses the login) ends the page with one message
    naming the database and the problem, below what the page drew before it needed the
    database (the Run page's form), instead of a traceback."""
    try:
        yield
    except (StoreError, sqlite3.Error) as exc:
        fix = ("check that the server is up and the URL's user may read and write that database"
               if is_url(default_path()) else "repair or move the file")
        st.error(ui.plain(database_problem(default_path(), exc)) + ". Stored runs cannot be shown or added until "
                 f"it is fixed: {fix}, or set TRADEOFF\\_LAB\\_DB to another one.")


def load_demo(store: Store) -> list[ImportOutcome]:
    """Import every bundle under app/demo/ (idempotent: a second load skips them all)."""
    return [import_bundle(store, path.name, path.read_bytes(), origin="demo") for path in sorted(DEMO_DIR.glob("*.jsonl"))]
