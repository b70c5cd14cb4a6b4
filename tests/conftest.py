"""Shared pytest set-up: every test gets its own device-queue directory and database, ``gpu``
tests skip without CUDA, and tests/pg_server.py's PostgreSQL fixtures are shared. Markers and
the per-test timeout live in pyproject.toml."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.pg_server import pg_database, pg_server  # noqa: E402,F401 - fixtures: one server per session


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """A private lock directory and database per test: no test waits behind a benchmark
    another process runs on this machine, and none sees another's stored runs."""
    monkeypatch.setenv("TRADEOFF_LAB_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("TRADEOFF_LAB_DB", str(tmp_path / "runs.sqlite"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
