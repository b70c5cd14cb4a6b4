"""A team database on PostgreSQL: the CLI and the dashboard through a postgresql:// URL, one
table declaration for both backends, and messages that name the database but never its
password. (The store's behaviour tests run against both backends in tests/test_store.py.)"""
import json
import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from app import storage
from engine import cli, devicelock
from engine.results import Result, dumps_jsonl
from engine.store import COLUMN_NAMES, Store, StoreError, display_name
from tests.app_fixtures import click, make_result, make_sweep, open_app, shown
from tests.conftest import ROOT
from tests.pg_server import PASSWORD
from tests.test_cli import TINY, _finish, _start
from tests.test_store import execute


def _engine(*args, env=None, timeout=180):
    code, out, err = _finish(_start(list(args), env or {**os.environ, "PYTHONPATH": ROOT}), timeout)
    assert PASSWORD not in out + err
    return code, out, err


def test_display_name_leaves_out_the_password_wherever_the_url_has_it():
    assert display_name("postgresql://team:pw@db.example:5433/runs?sslmode=require") == \
        "postgresql://team@db.example:5433/runs?sslmode=require"
    assert display_name("postgres://db.example/runs?password=pw&sslmode=require&user=team") == \
        "postgres://db.example/runs?sslmode=require&user=team"
    assert display_name("postgresql://h1:5432,h2:5432/runs") == "postgresql://h1:5432,h2:5432/runs"
    assert display_name("data/runs.sqlite") == "data/runs.sqlite"


def test_both_backends_create_the_one_declared_table(pg_database, tmp_path):
    path = str(tmp_path / "runs.sqlite")
    for target in (path, pg_database):
        Store(target)
    with sqlite3.connect(path) as conn:
        assert tuple(row[1] for row in conn.execute("PRAGMA table_info(runs)")) == COLUMN_NAMES
    columns = execute(pg_database, "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs' "
                                   "ORDER BY ordinal_position")
    assert tuple(name for (name,) in columns) == (*COLUMN_NAMES, "seq")  # seq: insertion order (SQLite's rowid)
    assert sorted(execute(pg_database, "SELECT indexname FROM pg_indexes WHERE tablename = 'runs'")) == \
        sorted(execute(path, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' "
                             "AND name NOT LIKE 'sqlite_autoindex%'") + [("runs_pkey",)])


def test_sessions_opening_a_new_database_at_once_create_it_once(pg_database):
    errors = []

    def open_and_add():
        try:
            Store(pg_database).add(make_result(batch=2))
        except StoreError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and Store(pg_database).count() == 6
    assert execute(pg_database, "SELECT version FROM tradeoff_lab_version") == [(1,)]


def test_a_newer_database_format_is_refused(pg_database):
    Store(pg_database)
    execute(pg_database, "UPDATE tradeoff_lab_version SET version = 2")
    with pytest.raises(StoreError, match="database format 2 is newer than this version reads"):
        Store(pg_database)


def test_an_unreachable_server_or_a_wrong_password_names_the_database_not_the_password(pg_server):
    down = f"postgresql://tradeoff:{PASSWORD}@127.0.0.1:1/runs"
    with pytest.raises(StoreError) as error:
        Store(down)
    assert str(error.value).startswith("postgresql://tradeoff@127.0.0.1:1/runs: cannot open the results database (")
    wrong = pg_server.url().replace(PASSWORD, "not-" + PASSWORD)
    with pytest.raises(StoreError, match="password authentication failed") as error:
        Store(wrong)
    assert PASSWORD not in str(error.value) and str(error.value).startswith(display_name(wrong) + ": ")


def test_a_read_only_database_fails_the_write_check_but_still_lists(pg_server, pg_database):
    store = Store(pg_database)
    store.add(make_result(batch=1))
    name = pg_database.rsplit("/", 1)[1]
    execute(pg_server.url(), f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    with pytest.raises(StoreError, match=r"cannot check the results database \(.*read-only transaction"):
        store.check_writable()
    assert store.count() == 1


def test_a_sqlite_store_never_imports_psycopg_and_a_url_without_it_says_how_to_install(tmp_path, monkeypatch):
    code = ("import sys; from engine.store import Store; Store(sys.argv[1]).count(); "
            "assert 'psycopg' not in sys.modules, 'psycopg imported for SQLite'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs.sqlite")], cwd=ROOT, check=True)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    with pytest.raises(StoreError, match=r"^postgresql://u@h/runs: a PostgreSQL database needs psycopg; "
                                         r"install it with: python3 -m pip install 'psycopg\[binary\]>=3.2'$"):
        Store(f"postgresql://u:{PASSWORD}@h/runs")


def test_queue_files_of_a_server_database_live_in_the_temp_dir(monkeypatch):
    monkeypatch.delenv("TRADEOFF_LAB_LOCK_DIR")
    monkeypatch.setenv("TRADEOFF_LAB_DB", "postgresql://team@db.example/runs")
    assert devicelock.lock_dir() == os.path.join(devicelock.tempfile.gettempdir(), "tradeoff-lab-locks")


def test_cli_runs_imports_lists_and_recommends_through_a_postgresql_url(pg_database, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": ROOT}
    wrong_password = _start(["list", "--db", pg_database.replace(PASSWORD, "wrong")], env)  # meanwhile
    code, out, err = _engine("run", *TINY, "--batch", "2", "--json", "--db", pg_database)
    assert code == 0, err
    measured = Result.from_dict(json.loads(out), "stdout")
    assert Store(pg_database).get(measured.id) == measured
    bundle = tmp_path / "team.jsonl"
    bundle.write_text(dumps_jsonl(make_sweep(batches=(1, 2), precisions=("fp32",))))
    code, out, err = _engine("import", str(bundle), "--db", pg_database)
    assert code == 0 and "imported 2 run(s), skipped 0" in out, err
    code, out, err = _engine("import", str(bundle), env={**env, "TRADEOFF_LAB_DB": pg_database})
    assert code == 0 and "imported 0 run(s), skipped 2" in out, err  # the default database is $TRADEOFF_LAB_DB
    code, out, err = _engine("list", "--db", pg_database)
    assert code == 0, err
    assert measured.id[:8] in out and len([line for line in out.splitlines() if "gpt-tiny" in line]) == 3
    assert cli.main(["recommend", "--db", pg_database, "--effective-batch", "2", "--memory-budget-gib", "80",
                     "--model", measured.config.model_label, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"]["id"] == measured.id
    code, out, err = _finish(wrong_password)
    assert code == 2 and PASSWORD not in err and err.startswith(f"error: {display_name(pg_database)}: cannot open the results database ("), err


def test_the_dashboard_reads_runs_from_postgresql_and_an_unreachable_server_is_one_message(pg_database, monkeypatch):
    Store(pg_database).add_many(make_sweep(batches=(1, 2), oom_batch=2))
    monkeypatch.setenv("TRADEOFF_LAB_DB", pg_database)
    at = open_app("views/results.py")
    assert sorted(at.dataframe[0].value["status"]) == ["ok", "ok", "oom", "oom"]
    assert storage.get_store().path == display_name(pg_database)

    down = f"postgresql://tradeoff:{PASSWORD}@127.0.0.1:1/runs"
    monkeypatch.setenv("TRADEOFF_LAB_DB", down)
    at = open_app()
    click(at, "Run benchmark")  # refused with why, before anything is measured
    assert not at.exception and "run.task" not in at.session_state
    assert shown(at.error[0].value).startswith(f"{display_name(down)}: ")
    for page in ("views/compare.py", "views/decide.py", "views/results.py"):
        at.switch_page(page).run()
        [error] = at.error
        text = shown(error.value)
        assert text.startswith(f"{display_name(down)}: cannot open the results database ("), (page, text)
        assert PASSWORD not in text and "check that the server is up" in text and "TRADEOFF_LAB_DB" in text
    at.switch_page("views/device.py").run()
    assert not at.exception and not at.error and at.title[0].value == "Device"
