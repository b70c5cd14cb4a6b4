"""Storage glue: the run store every session shares, one message when its database is
unusable, and the demo data set."""
from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Iterator

import streamlit as st

from engine.store import ImportOutcome, Store, StoreError, default_path, import_bundle

from . import ui

DEMO_DIR = Path(__file__).parent / "demo"


@st.cache_resource(show_spinner=False)
def _open_store(path: str | None) -> Store:
    return Store(path)


def get_store() -> Store:
    """The store at $TRADEOFF_LAB_DB (default data/runs.sqlite), one per path per server.

    Keyed by the variable's current value, so a test (or a second app) pointing at another
    database never gets a store opened for the first one. Raises StoreError when the file
    cannot be used; that is not cached, so once the file is fixed the next page run opens it.
    """
    return _open_store(os.environ.get("TRADEOFF_LAB_DB"))


def database_problem(path: str, exc: Exception) -> str:
    """Which database file and what is wrong with it: a StoreError says both; a bare SQLite
    error (damaged pages met by a query) gets the file's name."""
    return str(exc) if isinstance(exc, StoreError) else f"{path}: the results database cannot be used ({exc})"


@contextlib.contextmanager
def database_errors_shown() -> Iterator[None]:
    """Around a page: an unusable results database (not SQLite, damaged, unreadable or
    read-only) ends the page with one message naming the file and the problem, below what the
    page drew before it needed the database (the Run page's form), instead of a traceback."""
    try:
        yield
    except (StoreError, sqlite3.Error) as exc:
        st.error(ui.plain(database_problem(default_path(), exc)) + ". Stored runs cannot be shown or added until "
                 "it is fixed: repair or move the file, or set TRADEOFF\\_LAB\\_DB to another one.")


def load_demo(store: Store) -> list[ImportOutcome]:
    """Import every bundle under app/demo/ (idempotent: a second load skips them all)."""
    return [import_bundle(store, path.name, path.read_bytes(), origin="demo") for path in sorted(DEMO_DIR.glob("*.jsonl"))]
