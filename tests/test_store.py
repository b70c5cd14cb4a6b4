"""The results store: persistence, filters, duplicates, concurrency, speed. The behaviour
tests run against both backends (a SQLite file and a database on a throw-away PostgreSQL
server, tests/pg_server.py); the file-level ones are SQLite's own."""
import json
import multiprocessing
import os
import re
import sqlite3
import threading
import time

import pytest

from engine import BenchConfig
from engine.results import Result
from engine.store import Store, StoreError, is_url
from tests.test_results import ENV, ok_result


def _failed(model="mlp", sweep_id=None):
    return Result.new(BenchConfig(model=model, device="cpu"), "oom", ENV, error="out of memory", sweep_id=sweep_id)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """Where the test's store lives: a new SQLite file (in a directory not made yet), or a new
    database of its own on the test PostgreSQL server (a URL with a password)."""
    if request.param == "sqlite":
        return str(tmp_path / "sub" / "runs.sqlite")
    return request.getfixturevalue("pg_database")


def execute(target: str, sql: str, params=()) -> list[tuple]:
    """Run ``sql`` (``?`` parameters) straight on the store's database, as another program
    would; returns the rows it selects."""
    if is_url(target):
        import psycopg

        with psycopg.connect(target) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []
    with sqlite3.connect(target) as conn:
        return conn.execute(sql, params).fetchall()


def test_add_get_list_and_survive_reopen(target):
    store = Store(target)
    first, second = ok_result(batch=1), _failed()
    assert store.add(first) is True
    assert store.add(second) is True
    assert store.add(first) is False  # same id: not stored twice

    reopened = Store(target)
    assert reopened.count() == 2
    assert reopened.get(first.id) == first
    assert reopened.get("missing") is None
    assert [r.id for r in reopened.list()] == [second.id, first.id]  # newest first
    [(stored,)] = execute(target, "SELECT json FROM runs WHERE id = ?", (first.id,))
    assert stored == first.to_json()  # the result's own JSON, byte for byte


def test_runs_made_in_the_same_instant_list_newest_stored_first(target):
    store = Store(target)
    same_time = [ok_result().replace(created_at="2025-01-01T00:00:00+00:00") for _ in range(5)]
    store.add_many(same_time[:3])
    store.add_many(same_time[3:])
    assert [r.id for r in store.list()] == [r.id for r in reversed(same_time)]


def test_a_new_sqlite_file_is_in_wal_mode(tmp_path):
    path = tmp_path / "runs.sqlite"
    Store(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_filters_limit_delete_and_latest_sweep(target):
    store = Store(target)
    a, b = ok_result().replace(sweep_id="sweep-a"), ok_result().replace(sweep_id="sweep-a")
    c = _failed(model="mlp", sweep_id="sweep-b")
    d = ok_result().replace(sweep_id=None)
    assert store.add_many([a, b, c, d, a]) == (4, 1)
    assert store.add_many([]) == (0, 0)
    assert {r.id for r in store.list(sweep_id="sweep-a")} == {a.id, b.id}
    assert [r.id for r in store.list(status="oom")] == [c.id]
    assert [r.id for r in store.list(model="mlp")] == [c.id]
    assert {r.id for r in store.list(ids=[a.id, d.id, "nope"])} == {a.id, d.id}
    assert store.list(ids=[]) == []
    assert len(store.list(limit=2)) == 2
    assert [r.id for r in store.list(status="ok", limit=1)] == [d.id]
    assert store.latest_sweep_id() == "sweep-b"
    assert store.delete([c.id, "nope"]) == 1
    assert store.delete([]) == 0
    assert store.latest_sweep_id() == "sweep-a"
    assert store.count() == 3


def test_a_failed_write_stores_nothing_of_the_batch(target):
    store = Store(target)
    bad = ok_result().replace(config=None)  # not a Result the store can write
    with pytest.raises(AttributeError):
        store.add_many([ok_result(), bad])
    assert store.count() == 0  # one transaction: nothing half-written


def test_a_row_that_no_longer_reads_is_listed_as_unreadable_and_can_be_deleted(target):
    store = Store(target)
    good = ok_result()
    store.add_many([good, ok_result().replace(id="broken")])
    [(text,)] = execute(target, "SELECT json FROM runs WHERE id = 'broken'")
    execute(target, "UPDATE runs SET json = ? WHERE id = 'broken'",
            (json.dumps({**json.loads(text), "config": {**json.loads(text)["config"], "model": 7}}),))
    assert [r.id for r in store.list()] == [good.id]
    [(row_id, problem)] = store.unreadable()
    assert row_id == "broken" and "config.model: invalid value 7" in problem
    assert store.delete([row_id]) == 1 and store.unreadable() == []


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not the runs you are looking for\n" * 100)
    with pytest.raises(StoreError, match="notes.txt"):
        Store(path)


def test_opening_an_existing_store_writes_nothing(tmp_path):
    path = tmp_path / "runs.sqlite"
    Store(path).add(ok_result())
    before = os.stat(path).st_mtime_ns
    time.sleep(0.01)
    assert Store(path).count() == 1
    assert os.stat(path).st_mtime_ns == before  # so a store on a full disk still lists


def test_only_a_duplicate_id_counts_as_skipped_any_other_failure_is_an_error(target, monkeypatch):
    store = Store(target)
    first = ok_result()
    assert store.add_many([first, first]) == (1, 1)
    row = Store._row
    monkeypatch.setattr(Store, "_row", staticmethod(lambda result: (*row(result)[:3], None, *row(result)[4:])))
    not_null = r'(NOT NULL constraint failed: runs\.model|null value in column "model")'
    with pytest.raises(StoreError, match=re.escape(store.path) + ": cannot store the run.*" + not_null):
        store.add(ok_result())  # a NULL model column must not pass as "already stored"
    assert store.count() == 1


def test_sqlite_failures_become_store_errors_naming_the_file(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = Store(path)
    store.add_many([ok_result() for _ in range(30)])
    with open(path, "r+b") as f:
        f.seek(2 * 4096)
        f.write(b"\xde\xad" * 8192)
    with pytest.raises(StoreError, match="runs.sqlite: the results database is damaged"):
        store.check_writable()
    with pytest.raises(StoreError, match="runs.sqlite: cannot read the results database .*malformed"):
        store.list()


def _add_from_process(path, n):
    store = Store(path)
    for _ in range(n):
        store.add(ok_result())


def test_concurrent_threads_and_processes(target):
    path = target
    Store(path)
    ctx = multiprocessing.get_context("fork")  # forked writers start instantly (torch already imported)
    procs = [ctx.Process(target=_add_from_process, args=(path, 25)) for _ in range(2)]
    threads = [threading.Thread(target=_add_from_process, args=(path, 25)) for _ in range(3)]
    for worker in (*procs, *threads):
        worker.start()
    for worker in (*procs, *threads):
        worker.join()
    assert all(p.exitcode == 0 for p in procs)
    assert Store(path).count() == 125


def test_listing_thousands_of_runs_stays_fast(target):
    store = Store(target)
    template = ok_result()
    results = [template.replace(id=f"{i:032x}", created_at=f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}+00:00")
               for i in range(2000)]
    started = time.perf_counter()
    assert store.add_many(results) == (2000, 0)
    listed = store.list()
    filtered = store.list(status="ok", limit=50)
    elapsed = time.perf_counter() - started
    assert len(listed) == 2000 and len(filtered) == 50
    assert elapsed < 3.0, f"store took {elapsed:.2f} s for 2000 runs"
