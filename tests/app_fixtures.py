"""Dashboard test helpers: AppTest shortcuts (synthetic results come from tests/factories.py;
the Run-page tests and the browser test use the real engine instead)."""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import pytest
from streamlit.testing.v1 import AppTest

from engine.store import Store
from tests.factories import CPU_ENV, H100_ENV, make_result, make_sweep, with_metrics  # noqa: F401 - re-exported


# --------------------------------------------------------------------------- AppTest helpers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "app", "main.py")
# Generous: the first script run imports torch and plotly; a slow CI machine must not flake.
APP_TIMEOUT_S = 60
# How long a test waits for a background task (tiny CPU runs, but a cold worker imports torch).
TASK_TIMEOUT_S = 180
# Model dimensions small enough that a CPU run takes well under a second once the worker is warm.
TINY_DIMS = {"seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 2, "vocab": 256}


@pytest.fixture
def app_db() -> Store:
    """The test's own empty store (conftest points TRADEOFF_LAB_DB at a temporary file)."""
    return Store(os.environ["TRADEOFF_LAB_DB"])


def open_app(page: str | None = None, query: dict | None = None) -> AppTest:
    """Run the app once (on ``page``, e.g. "views/compare.py", if given) and return the AppTest."""
    at = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S)
    at.query_params.update(query or {})
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_titles(at: AppTest) -> list[str]:
    """Titles of the plotly charts on the page, in order."""
    return [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")]


def chart(at: AppTest, title: str) -> dict:
    """The figure dict of the chart with this title."""
    [figure] = [f for f in (json.loads(c.proto.spec) for c in at.get("plotly_chart")) if f["layout"]["title"]["text"] == title]
    return figure


def click(at: AppTest, label: str) -> AppTest:
    """Click the button with this label and rerun."""
    [button] = [b for b in at.button if b.label == label]
    return button.click().run()


def task(at: AppTest, key: str):
    """The state of the background task under ``key`` (app/tasks.py) as the thread has it now."""
    return at.session_state[key].state()


def wait_until(at: AppTest, until: Callable[[AppTest], bool], timeout: float = TASK_TIMEOUT_S,
               what: str = "the condition") -> AppTest:
    """Rerun the page (as a task's polling fragment would) until ``until(at)`` holds, then once
    more so the page draws that state; fails after ``timeout`` seconds or on an exception."""
    deadline = time.monotonic() + timeout
    while True:
        at.run()
        if until(at):
            at.run()
            assert not at.exception, [e.value for e in at.exception]
            return at
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.2)


def finished(key: str) -> Callable[[AppTest], bool]:
    """``wait_until``'s condition: the task under ``key`` is done."""
    return lambda at: task(at, key).done


def tiny_settings(at: AppTest, steps: int = 2, **fields) -> AppTest:
    """The shared form set to gpt-tiny with tiny dimensions on the CPU, one warm-up step,
    ``steps`` measured steps and any other ``fields`` (number inputs by field name)."""
    for name, value in TINY_DIMS.items():
        at.number_input(key=f"config.dim.gpt-tiny.{name}").set_value(value)
    for name, value in {"warmup": 1, "steps": steps, **fields}.items():
        at.number_input(key=f"config.{name}").set_value(value)
    at.selectbox(key="config.device").set_value("cpu")
    return at.run()
