"""Storage glue: the run store every session shares, bundle import and the demo data set."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from engine.results import ResultFormatError, parse_results
from engine.store import Store

DEMO_DIR = Path(__file__).parent / "demo"


@st.cache_resource(show_spinner=False)
def _open_store(path: str | None) -> Store:
    return Store(path)


def get_store() -> Store:
    """The store at $TRADEOFF_LAB_DB (default data/runs.sqlite), one per path per server.

    Keyed by the variable's current value, so a test (or a second app) pointing at another
    database never gets a store opened for the first one.
    """
    return _open_store(os.environ.get("TRADEOFF_LAB_DB"))


@dataclass(frozen=True)
class ImportOutcome:
    """What importing one file did: runs added, duplicates skipped, or why nothing was imported."""

    name: str
    added: int = 0
    skipped: int = 0
    error: str | None = None

    def message(self) -> str:
        if self.error:
            return f"{self.error} — nothing from {self.name} was imported."
        return f"{self.name}: imported {self.added} run(s), skipped {self.skipped} already stored (same id)."


def import_bundle(store: Store, name: str, data: bytes) -> ImportOutcome:
    """Validate a whole bundle first, then add it: a bad file imports nothing from it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ImportOutcome(name, error=f"{name}: not UTF-8 text (byte {exc.start}), so not a results bundle")
    try:
        results = parse_results(text, name)
    except ResultFormatError as exc:
        return ImportOutcome(name, error=str(exc))
    if not results:
        return ImportOutcome(name, error=f"{name}: the file holds no results")
    added, skipped = store.add_many(results)
    return ImportOutcome(name, added, skipped)


def load_demo(store: Store) -> list[ImportOutcome]:
    """Import every bundle under app/demo/ (idempotent: a second load skips them all)."""
    return [import_bundle(store, path.name, path.read_bytes()) for path in sorted(DEMO_DIR.glob("*.jsonl"))]
