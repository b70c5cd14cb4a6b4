"""Untrusted files stay data on the command line: every hostile file of tests/hostile.py is one
clear message and exit code 2 from ``show`` and ``import`` (and imports nothing); ``list`` and
``import`` themselves; a torn last line is skipped with a warning; other crash reports of the
issue (NaN arguments, 30-digit numbers, a builder that exits) are one line too."""
import json
import sqlite3

import pytest

from engine import cli
from engine.results import Result, ResultList, dumps_jsonl, parse_results
from engine.store import Store, import_bundle
from tests.factories import make_result
from tests.hostile import MARKDOWN_IMAGE, REJECTED, payload_results, torn


@pytest.fixture
def db(tmp_path):
    """A database already holding one run, so "imported nothing" is a count that did not move."""
    path = tmp_path / "runs.sqlite"
    Store(path).add(make_result(batch=1))
    return str(path)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""  # no half-drawn table (nan, inf)
    return captured.err


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_show_and_import_refuse_each_hostile_file_with_one_message(name, tmp_path, db, capsys):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(REJECTED[name])
    assert cli.main(["show", str(path)]) == 2
    assert str(path) in _one_error_line(capsys)
    assert cli.main(["import", str(path), "--db", db]) == 2
    err = _one_error_line(capsys)
    assert str(path) in err and f"nothing from {path} was imported" in err
    assert "already stored" not in err
    assert Store(db).count() == 1


def test_a_null_model_is_reported_as_rejected_never_as_a_duplicate(db):
    outcome = import_bundle(Store(db), "null.jsonl", REJECTED["model-null"])
    assert not outcome.ok and "config.model: invalid value None" in outcome.error
    assert "already stored" not in outcome.message()


def test_import_counts_added_and_skipped_per_file_and_goes_on_past_a_bad_file(tmp_path, db, capsys):
    runs = [make_result(batch=b) for b in (2, 4)]
    good, bad, payloads = tmp_path / "team.jsonl", tmp_path / "bad.jsonl", tmp_path / "payloads.jsonl"
    good.write_text(dumps_jsonl(runs))
    bad.write_bytes(REJECTED["nan"])
    payloads.write_text(dumps_jsonl(payload_results()))
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["import", str(good), str(bad), str(missing), str(payloads), "--db", db]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{good}: imported 2 run(s), skipped 0 already stored (same id).",
        f"{payloads}: imported 2 run(s), skipped 0 already stored (same id).",
    ]
    errors = captured.err.splitlines()
    assert len(errors) == 2 and "bad.jsonl: line 1: not valid JSON (NaN is not a JSON number)" in errors[0]
    assert f"{missing}: No such file or directory" in errors[1]
    assert cli.main(["import", str(good), "--db", db]) == 0
    assert capsys.readouterr().out == f"{good}: imported 0 run(s), skipped 2 already stored (same id).\n"
    assert Store(db).count() == 5


def test_list_shows_stored_runs_and_says_when_rows_are_unreadable(db, capsys):
    stored = Store(db)
    run = make_result(batch=4)
    stored.add(run)
    assert cli.main(["list", "--db", db]) == 0
    captured = capsys.readouterr()
    header, _, *rows = captured.out.splitlines()
    assert header.split()[:3] == ["id", "status", "model"] and len(rows) == 2
    assert rows[0].split()[:4] == [run.id[:8], "ok", "gpt-tiny", "4"]  # newest first
    assert captured.err == ""
    with sqlite3.connect(db) as conn:  # a row another version wrote
        conn.execute("INSERT INTO runs VALUES ('broken-row', '2099-01-01', 'ok', 'gpt-tiny', NULL, '{\"schema\": 2}')")
    assert cli.main(["list", "--db", db]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4
    assert captured.err.startswith("warning: 1 stored row(s) cannot be read") and "broken-r" in captured.err


@pytest.mark.parametrize("args, phrase", [
    (["list", "--db", "{tmp}/none.sqlite"], "none.sqlite: no such database"),
    (["list", "--db", ""], "--db: the path is empty"),
    (["import", "{tmp}/x.jsonl", "--db", ""], "--db: the path is empty"),
    (["recommend", "--db", "", "--effective-batch", "2", "--memory-budget-gib", "1"], "--db: the path is empty"),
    (["predict", "--capacity-gib", "nan", "--analytic-only"], "--capacity-gib: 'nan' needs one or more finite values"),
    (["predict", "--batches", "1,nan"], "--batches: '1,nan' is not a comma list of numbers"),
    (["run", "--batch", "9" * 30, "--device", "cpu"], f"batch: invalid value '{'9' * 30}'"),
    (["run", "--model", "builtins:exit", "--device", "cpu"], "model: invalid value 'builtins:exit'; allowed: a builder that runs (SystemExit"),
    (["show", "{db}"], "is a SQLite database of runs, not a results file; list it with: python -m engine list --db"),
])
def test_crash_reports_are_one_line_and_exit_2(args, phrase, tmp_path, db, capsys):
    args = [arg.format(tmp=tmp_path, db=db) for arg in args]
    assert cli.main(args) == 2
    assert phrase in _one_error_line(capsys)


def test_a_torn_last_line_is_skipped_with_a_warning_by_show_and_import(tmp_path, db, capsys):
    runs = [make_result(batch=b) for b in (2, 4, 8)]
    path = tmp_path / "torn.jsonl"
    path.write_bytes(torn(runs))
    assert cli.main(["show", str(path)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 + 3
    assert captured.err == f"warning: {path}: line 4 was cut short (no newline, not complete JSON: a write that did " \
                           "not finish) and was skipped\n"
    assert cli.main(["import", str(path), "--db", db]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: imported 3 run(s), skipped 0 already stored (same id). Note: ")


def test_only_a_last_line_without_newline_counts_as_torn():
    runs = [make_result(batch=b) for b in (2, 4)]
    cut = runs[1].to_json()[:40]
    assert parse_results(dumps_jsonl(runs[:1]) + cut, "f").notes  # torn: skipped
    with pytest.raises(ValueError, match="f: line 2: not valid JSON"):
        parse_results(dumps_jsonl(runs[:1]) + cut + "\n", "f")  # a complete bad line
    with pytest.raises(ValueError, match="f: line 1: not valid JSON"):
        parse_results(cut + "\n" + dumps_jsonl(runs), "f")  # in the middle
    with pytest.raises(ValueError, match="f: line 2: not valid JSON"):
        parse_results(dumps_jsonl(runs[:1]) + "not json", "f")  # not the start of a result line


def test_u2028_inside_a_json_string_is_text_not_a_line_break(tmp_path, capsys):
    data = make_result(batch=2).to_dict()
    data["warnings"] = ["before\u2028after\u2029end"]
    path = tmp_path / "u2028.jsonl"
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    [result] = parse_results(path.read_text(encoding="utf-8"), "u2028.jsonl")
    assert result.warnings == ("before\u2028after\u2029end",)
    assert cli.main(["show", str(path)]) == 0 and data["id"][:8] in capsys.readouterr().out


def test_import_bundle_is_the_results_pages_import(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    outcome = import_bundle(store, "team.jsonl", dumps_jsonl(payload_results()).encode())
    assert (outcome.ok, outcome.added, outcome.skipped) == (True, 2, 0)
    assert MARKDOWN_IMAGE in store.list()[0].env.device_name  # hostile text is stored as data
    assert {r.origin for r in store.list()} == {"imported"}  # a teammate's runs never pass for this machine's
    assert import_bundle(store, "empty.jsonl", b"").error == "empty.jsonl: the file holds no results"
    sqlite = import_bundle(store, "runs.sqlite", (tmp_path / "runs.sqlite").read_bytes())
    assert sqlite.error == "runs.sqlite: a SQLite database of runs, not a results file"
    assert store.count() == 2
    parsed = parse_results(dumps_jsonl(payload_results()), "x")
    assert isinstance(parsed, ResultList) and all(isinstance(r, Result) for r in parsed)
