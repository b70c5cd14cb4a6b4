"""The dashboard against hostile input (AppTest): rejected files import nothing and say why,
text from files, links and the machine stays plain text, any schema-valid stored row draws,
and an unusable database is one message instead of a traceback."""
import dataclasses
import os
import re
import sqlite3
import sys
import time

import pytest

from app import tasks
from app.params import to_query_params
from engine import devices, nvml
from engine.results import Env, MemoryBreakdown
from engine.stats import Summary
from engine.store import Store, StoreError
from tests.app_fixtures import (app_db, assert_plain_markdown, chart_strings, click, make_result, markdown_texts,  # noqa: F401
                                open_app, shown, upload, with_metrics)
from tests.hostile import HTML_IMAGE, MARKDOWN_IMAGE, MARKDOWN_LINK, REJECTED, payload_results

PAGES = ("views/run.py", "views/compare.py", "views/decide.py", "views/results.py", "views/device.py")
# A user model's name is free text up to its colon: a file can put HTML and Markdown there.
HOSTILE_MODEL = f"<a href='https://example.invalid/x'>{MARKDOWN_IMAGE}</a>:build"


def visit(at, page: str):
    """Switch to ``page`` and check it drew without an exception."""
    at.switch_page(page).run()
    assert not at.exception, (page, [e.value for e in at.exception])
    return at


# --------------------------------------------------------------------------- rejected files
def test_every_rejected_file_gives_one_clear_message_imports_nothing_and_no_page_breaks(app_db):
    app_db.add_many(payload_results())
    at = upload(open_app("views/results.py"), *((f"{name}.jsonl", data) for name, data in REJECTED.items()))
    errors = [shown(e.value) for e in at.error]
    assert not at.success and len(errors) == len(REJECTED)
    for name, error in zip(REJECTED, errors):
        file = f"{name}.jsonl"
        # The file, where and what is wrong, and that nothing of it was imported.
        assert re.fullmatch(rf"{re.escape(file)}: (line 1: )?\S.{{10,}} — nothing from {re.escape(file)} was imported\.",
                            error), error
    assert app_db.count() == len(payload_results())
    for page in PAGES:
        assert_plain_markdown(visit(at, page))


def test_a_file_name_is_shown_as_written():
    name = f"{MARKDOWN_IMAGE} {MARKDOWN_LINK}.jsonl"
    at = upload(open_app("views/results.py"), (name, b"not json\n"))
    [error] = at.error
    assert shown(error.value).startswith(f"{name}: line 1: not valid JSON")
    assert_plain_markdown(at)


# --------------------------------------------------------------------------- plain text
@pytest.fixture
def hostile_store(app_db, monkeypatch):
    """Payload runs (hostile device, CPU, error, warnings), a run of a model whose name is
    HTML, a second device so devices are listed in a warning, and a GPU and CPU whose names
    are Markdown on the Device page."""
    model_run = make_result(model=HOSTILE_MODEL)
    other = make_result(batch=2)
    other = other.replace(env=dataclasses.replace(other.env, device_name=f"{HTML_IMAGE} 2"))
    app_db.add_many([model_run, other, *payload_results()])  # newest: the OOM with the hostile error
    gpu = {"index": 0, "name": f"GPU {MARKDOWN_IMAGE}", "uuid": "GPU-0", "memory_used_bytes": None,
           "memory_total_bytes": None, "utilization_pct": None, "temperature_c": None, "power_w": None,
           "driver": MARKDOWN_LINK, "cuda": HTML_IMAGE}
    monkeypatch.setattr(nvml, "list_gpus", lambda: [gpu])
    monkeypatch.setattr(devices, "cpu_model_name", lambda: f"CPU {MARKDOWN_LINK}")
    return app_db


def test_every_page_shows_hostile_text_as_plain_text(hostile_store):
    at = open_app()
    assert_plain_markdown(at)
    at.session_state["compare.ids"] = [r.id for r in hostile_store.list()]  # every run, as sent from Results
    for page in PAGES[1:]:
        assert_plain_markdown(visit(at, page))
    at.switch_page("views/compare.py").run()
    assert any("different environments" in t and HTML_IMAGE in shown(t) for t in markdown_texts(at))
    # Charts: plotly draws <a href> and friends in names, labels and hover text; each
    # hostile tag reaches the figure escaped, so it is drawn as text.
    strings = chart_strings(at)
    assert strings and not [s for s in strings if "<img" in s or "<a " in s]
    assert any("&lt;img" in s for s in strings) and any("&lt;a href" in s for s in strings)


def test_a_link_value_is_quoted_as_plain_text():
    at = open_app(query={"precision": MARKDOWN_LINK, "model": MARKDOWN_IMAGE})
    warnings = [shown(w.value) for w in at.warning]
    assert any(f"precision={MARKDOWN_LINK!r} ignored" in w for w in warnings)
    assert any(f"model={MARKDOWN_IMAGE!r} ignored" in w for w in warnings)
    assert_plain_markdown(at)


def test_a_config_error_quoting_a_value_is_plain_text():
    at = open_app()
    at.segmented_control(key="run.mode").set_value("Sweep").run()
    at.multiselect(key="run.sweep.fields").set_value(["batch"]).run()
    at.text_input(key="run.sweep.batch").set_value(f"1,{MARKDOWN_IMAGE}").run()
    [error] = at.error
    assert MARKDOWN_IMAGE in shown(error.value)
    assert_plain_markdown(at)


# --------------------------------------------------------------------------- any stored row draws
def edge_results() -> list:
    """Schema-valid runs at every edge the pages must draw: every nullable metric null, zeros,
    the largest numbers, inverted spreads, empty and missing environment text, extreme dates
    and memory caps, empty errors and warnings, no samples, absurd settings."""
    ok = make_result(batch=2)
    big = sys.float_info.max
    zero, huge = Summary(0.0, 0.0, 0.0, 0.0), Summary(big, big, big, big)
    nullable = [f.name for f in dataclasses.fields(ok.metrics) if f.name not in ("effective_batch", "step_ms",
                                                                                  "forward_ms", "backward_ms",
                                                                                  "optimizer_ms")]
    runs = [
        with_metrics(ok, **{name: None for name in nullable}),
        with_metrics(ok, step_ms=zero, forward_ms=zero, backward_ms=zero, optimizer_ms=zero, samples_per_s=0.0,
                     tokens_per_s=0.0, peak_allocated_bytes=0, memory_breakdown_bytes=MemoryBreakdown(0, 0, 0, 0, 0),
                     mfu=0.0, grad_rel_diff=0.0),
        with_metrics(ok, step_ms=huge, forward_ms=huge, backward_ms=huge, optimizer_ms=huge, samples_per_s=big,
                     tokens_per_s=big, peak_allocated_bytes=2**63 - 1, memory_breakdown_bytes=MemoryBreakdown(*[2**63 - 1] * 5),
                     mfu=big, loss_scale=big, energy_j_per_sample=big, grad_rel_diff=big),
        with_metrics(ok, step_ms=Summary(5.0, 9.0, 1.0, 3.0), samples_per_s=5e-324, peak_allocated_bytes=1),
        ok.replace(env=Env(device_type="", device_name="", cpu="", capacity_bytes=0)),
        ok.replace(env=Env(), created_at="0001-01-01T00:00:00"),
        ok.replace(created_at="9999-12-31T23:59:59.999999+14:00", warnings=("", " "), samples={}),
        make_result(batch=2, memory_cap_gib=1e300),
        make_result("oom", batch=2, memory_cap_gib=1e-300),
        make_result("error", batch=3).replace(error=""),
        ok.replace(config=ok.config.replace(batch=2**31, accum=2**31 - 1, timeout_s=big, steps=2**63 - 1, seed=2**63 - 1),
                   metrics=dataclasses.replace(ok.metrics, effective_batch=2**31 * (2**31 - 1))),
    ]
    return [run.replace(id=f"edge-{i}", sweep_id="edges") for i, run in enumerate(runs)]


def test_pages_draw_any_schema_valid_stored_run(app_db):
    runs = edge_results()
    app_db.add_many(runs)
    assert app_db.count() == len(runs) and not app_db.unreadable()  # every one is a valid result
    at = open_app()
    at.session_state["compare.ids"] = [r.id for r in runs]
    for page in PAGES[1:]:
        visit(at, page)
    assert len(at.switch_page("views/results.py").run().dataframe[0].value) == len(runs)
    # Each run alone on the Run page (opened with its settings): its headline numbers, "–"
    # where a metric is null.
    headlines = []
    for run in runs[:4]:
        app_db.delete(r.id for r in app_db.list())
        app_db.add(run.replace(sweep_id=None))
        headlines.append([m.value for m in open_app(query=to_query_params(run.config)).metric])
    assert headlines[0][:2] == ["–", "–"]  # the run with every nullable metric null: no throughput, no peak


# --------------------------------------------------------------------------- unusable database
def _random_bytes(path: str) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(8192))


def _under_a_file(path: str) -> str:
    blocker = os.path.join(os.path.dirname(path), "not-a-directory")
    open(blocker, "w").close()
    return os.path.join(blocker, "runs.sqlite")


def _damaged_pages(path: str) -> None:
    """A real database of runs whose pages after the first (its header and schema) are trashed."""
    Store(path).add_many([make_result(batch=b) for b in range(1, 40)])
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(page)
        f.write(os.urandom(size - page))


@pytest.mark.parametrize("damage", [_random_bytes, _under_a_file, _damaged_pages])
def test_an_unusable_database_is_one_message_and_the_rest_keeps_working(monkeypatch, tmp_path, damage):
    path = str(tmp_path / "runs.sqlite")
    path = damage(path) or path
    monkeypatch.setenv("TRADEOFF_LAB_DB", path)
    at = open_app()
    # The Run page: its form and buttons, then one message naming the file.
    assert at.number_input(key="config.batch").value == 8 and [b for b in at.button if b.label == "Run benchmark"]
    [error] = at.error
    assert shown(error.value).startswith(f"{path}: ") and "TRADEOFF_LAB_DB" in shown(error.value)
    # Starting a run says why instead of measuring one whose result could not be stored.
    click(at, "Run benchmark")
    assert not at.exception and "run.task" not in at.session_state
    assert [shown(e.value) for e in at.error][0].startswith(f"{path}: ")
    for page in ("views/compare.py", "views/decide.py", "views/results.py"):
        visit(at, page)
        assert len(at.error) == 1 and shown(at.error[0].value).startswith(f"{path}: "), page
    visit(at, "views/device.py")
    assert not at.error and at.title[0].value == "Device"



def test_a_run_the_database_refuses_is_shown_and_offered_as_a_file(app_db, monkeypatch):
    refused = make_result(batch=2)

    def full_disk(store, result):
        raise StoreError(f"{store.path}: cannot store the run(s) (database or disk is full)")

    def work(progress, on_result, cancel):
        on_result(refused)
        on_result(make_result(batch=4))  # never reached: the task stops at the first refusal

    monkeypatch.setattr(Store, "add", full_disk)
    task = tasks.Task("Sweep", work, app_db)
    deadline = time.monotonic() + 30
    while not task.state().done:
        assert time.monotonic() < deadline, "the task did not end"
        time.sleep(0.01)
    at = open_app()
    at.session_state["run.task"] = task
    at.run()
    state = task.state()
    assert state.done and state.results == state.unsaved == (refused,)
    assert state.error == f"Sweep stopped: {app_db.path}: cannot store the run(s) (database or disk is full)"
    assert shown(at.error[0].value) == state.error
    [download] = [b for b in at.get("download_button") if "did not store" in b.proto.label]
    assert download.proto.label == "Download the 1 run(s) the database did not store"
