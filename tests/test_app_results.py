"""Results page: the table, import (good, corrupt, wrong version, duplicates), demo data, exports."""
import csv
import dataclasses
import html as html_text
import io
import json
import re
import sqlite3

from app import exports, storage
from engine.results import dumps_jsonl, parse_results
from tests.app_fixtures import (CPU_ENV, app_db, click, make_result, make_sweep, open_app, shown,  # noqa: F401
                                upload)
from tests.hostile import HTML_IMAGE, MARKDOWN_IMAGE, payload_results, torn


def messages(at) -> tuple[list[str], list[str]]:
    """The text the page's success and error messages show."""
    return [shown(s.value) for s in at.success], [shown(e.value) for e in at.error]


def test_results_page_lists_runs_with_status_and_key_metrics(app_db):
    app_db.add_many(make_sweep(batches=(1, 2), oom_batch=2))
    at = open_app("views/results.py")
    table = at.dataframe[0].value
    assert len(table) == 4
    assert {"status", "model", "device", "tokens/s", "peak GiB", "backward ms"} <= set(table.columns)
    assert sorted(table["status"]) == ["ok", "ok", "oom", "oom"]
    assert f"4 of 4 runs in {app_db.path}" in shown(at.caption[0].value)  # which database, by name
    at.multiselect(key="results.status").set_value(["oom"]).run()
    assert list(at.dataframe[0].value["status"]) == ["oom", "oom"]


def test_import_a_good_bundle_then_again_counts_duplicates(app_db):
    bundle = dumps_jsonl(make_sweep(batches=(1, 2, 4), precisions=("fp32",))).encode()
    at = upload(open_app("views/results.py"), ("team.jsonl", bundle))
    assert messages(at) == (["team.jsonl: imported 3 run(s), skipped 0 already stored (same id)."], [])
    assert app_db.count() == 3 and len(at.dataframe[0].value) == 3
    at = upload(at, ("team-copy.jsonl", bundle))
    assert messages(at) == (["team-copy.jsonl: imported 0 run(s), skipped 3 already stored (same id)."], [])
    assert app_db.count() == 3


def test_a_corrupt_file_imports_nothing_and_says_why(app_db):
    good = dumps_jsonl(make_sweep(batches=(1,), precisions=("fp32",)))
    corrupt = (good + '{"schema": "tradeoff-lab/result/v1", "id": \n').encode()  # a valid line, then a broken one
    at = upload(open_app("views/results.py"), ("broken.jsonl", corrupt), ("binary.json", b"\xff\xfe\x00junk"))
    successes, errors = messages(at)
    assert not successes and len(errors) == 2
    assert errors[0].startswith("broken.jsonl: line 2: not valid JSON") and "nothing from broken.jsonl was imported" in errors[0]
    assert "binary.json: not UTF-8" in errors[1]
    assert app_db.count() == 0
    assert not at.exception


def test_a_wrong_version_bundle_imports_nothing(app_db):
    results = make_sweep(batches=(1, 2), precisions=("fp32",))
    lines = [r.to_json() for r in results]
    lines[1] = json.dumps({**results[1].to_dict(), "schema": "tradeoff-lab/result/v2"})
    at = upload(open_app("views/results.py"), ("future.jsonl", "\n".join(lines).encode()))
    [error] = messages(at)[1]
    assert "future.jsonl: line 2: unsupported schema 'tradeoff-lab/result/v2'" in error
    assert app_db.count() == 0


def test_load_demo_data_puts_real_recorded_runs_in_the_store(app_db):
    demo = [r for path in sorted(storage.DEMO_DIR.glob("*.jsonl")) for r in parse_results(path.read_text(), path.name)]
    assert demo and all(r.env.device_type == "cpu" for r in demo)  # labelled with where they ran
    at = click(open_app("views/results.py"), "Load demo data")
    assert app_db.count() == len(demo)
    assert "imported" in messages(at)[0][0]
    assert {r.origin for r in app_db.list()} == {"demo"}  # never mistaken for runs measured here
    click(at, "Load demo data")
    assert app_db.count() == len(demo)  # a second load skips every run


def test_exports_round_trip_and_the_report_is_standalone():
    results = make_sweep(batches=(1, 2), oom_batch=2)
    assert parse_results(exports.bundle_bytes(results).decode(), "bundle") == results
    csv = exports.csv_bytes(results).decode().splitlines()
    assert csv[0].startswith("created,status,model,batch") and len(csv) == 5
    html = exports.report_html(results)
    assert html.startswith("<!DOCTYPE html>")
    # Offline: plotly.js is inlined, nothing is fetched from a CDN.
    assert not re.search(r"<script[^>]+src=", html) and "plotly.js v" in html.lower()
    for title in ("Throughput", "Peak memory", "Backward time", "Phase breakdown", "Memory breakdown"):
        assert f'"text":"{title}"' in html
    assert results[0].env.device_name in html and "OOM" in html
    embedded = re.search(r"<pre>(.*?)</pre>", html, re.S).group(1)
    assert parse_results(html_text.unescape(embedded), "report") == results


def test_unreadable_stored_runs_are_named_and_can_be_deleted(app_db):
    app_db.add_many(make_sweep(batches=(1,), precisions=("fp32",)))
    with sqlite3.connect(app_db.path) as conn:  # a row written by some other version
        conn.execute("INSERT INTO runs (id, created_at, status, model, sweep_id, json) VALUES "
                     "('broken', '2024-01-01T00:00:00+00:00', 'ok', 'gpt-tiny', NULL, '{\"schema\": \"v9\"}')")
    at = open_app("views/results.py")
    assert len(at.dataframe[0].value) == 1
    assert at.expander[0].label == "1 stored run(s) cannot be read and are not shown"
    assert "stored run broken" in at.code[0].value and "unsupported schema" in at.code[0].value
    click(at, "Delete the unreadable runs")
    assert app_db.count() == 1 and not app_db.unreadable()
    assert not [e for e in at.expander if "cannot be read" in e.label]


def test_csv_cells_a_spreadsheet_would_run_are_text():
    formulas = ['=HYPERLINK("https://example.invalid","click")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
                "\tx", "\rx"]
    results = [make_result("error", batch=2, env=dataclasses.replace(CPU_ENV, device_name=formula)).replace(error=formula)
               for formula in formulas] + [make_result(batch=2, model="@evil:build")]
    rows = list(csv.DictReader(io.StringIO(exports.csv_bytes(results).decode(), newline="")))
    assert [row["error"] for row in rows[:-1]] == ["'" + f for f in formulas]
    assert [row["device"] for row in rows[:-1]] == ["'" + f for f in formulas]
    assert rows[-1]["model"] == "'@evil:build" and rows[-1]["status"] == "ok"
    assert float(rows[-1]["samples/s"]) == results[-1].metrics.samples_per_s  # numbers stay numbers
    assert exports.spreadsheet_text(-1.5) == -1.5 and exports.spreadsheet_text("ok") == "ok"


def test_the_report_shows_text_from_runs_as_text():
    results = payload_results()
    html = exports.report_html(results)
    outside_scripts = re.sub(r"<script.*?</script>", "", html, flags=re.S)
    # Only the report's own markup: no image, link, or anything else that loads or navigates.
    assert not re.search(r"<(img|a|iframe|link|object|embed)\b", outside_scripts, re.I)
    assert html_text.escape(HTML_IMAGE, quote=False) in outside_scripts and MARKDOWN_IMAGE in outside_scripts
    # Inside the charts (plotly draws <a href> and friends from text), escaped too.
    figures = str([fig.to_dict() for fig in exports.report_figures(results)])
    assert "<img" not in figures and "&lt;img" in figures


def test_a_torn_last_line_is_skipped_with_a_note_and_the_rest_imports(app_db):
    at = upload(open_app("views/results.py"), ("torn.jsonl", torn(make_sweep(batches=(1, 2), precisions=("fp32",)))))
    [message] = messages(at)[0]
    assert message.startswith("torn.jsonl: imported 2 run(s)") and "line 3 was cut short" in message
    assert app_db.count() == 2
