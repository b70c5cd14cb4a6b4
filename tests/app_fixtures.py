"""Dashboard test helpers: AppTest shortcuts (synthetic results come from tests/factories.py;
the Run-page tests and the browser test use the real engine instead)."""
from __future__ import annotations

import json
import os
import re
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


def shown(markdown: str) -> str:
    """The text a Markdown element shows for text that went through ``ui.plain``: its
    backslash escapes undone and its invisible word joiners dropped."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")


def _elements(at: AppTest):
    """Every element and block of the page, main area and sidebar, depth first."""
    stack = [at.main, at.sidebar]
    while stack:
        node = stack.pop()
        yield node
        children = getattr(node, "children", None)
        if isinstance(children, dict):
            stack.extend(reversed(children.values()))


# Elements whose body Streamlit renders as Markdown (metric values too); every element's
# label and tooltip are Markdown as well, and so is a progress bar's text.
_MARKDOWN_BODIES = {"markdown", "caption", "title", "header", "subheader", "error", "warning", "info", "success",
                    "metric"}


def markdown_texts(at: AppTest) -> list[str]:
    """Every string the page hands Streamlit's Markdown renderer (not code blocks, dataframe
    cells, option lists or charts, which are shown as plain text)."""
    texts = []
    for node in _elements(at):
        texts += [value for value in (getattr(node, "label", None), getattr(node, "help", None)) if isinstance(value, str)]
        if getattr(node, "type", None) in _MARKDOWN_BODIES and isinstance(node.value, str):
            texts.append(node.value)
        if getattr(node, "type", None) == "progress":
            texts.append(node.proto.text)
    return texts


def assert_plain_markdown(at: AppTest) -> None:
    """No Markdown the page renders can draw an image or a link: no image or link syntax, no
    raw HTML tag, and no bare address GitHub-flavoured Markdown would link (it matches the
    text with escapes undone, so only the invisible word joiners of ``ui.plain`` stop it)."""
    for text in markdown_texts(at):
        unescaped = re.sub(r"\\(.)", r"\1", text)
        assert "![" not in text and "](" not in text and not re.search(r"(?<!\\)<[a-z]", text), text
        assert not re.search(r"(https?://|www\.)[-\w]+\.\w|\w@[-\w]+\.\w", unescaped, re.IGNORECASE), text


def chart_strings(at: AppTest) -> list[str]:
    """Every string of every plotly figure on the page (names, labels, hover text, titles)."""
    def leaves(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from leaves(item)
        elif isinstance(value, list):
            for item in value:
                yield from leaves(item)

    return [text for chart in at.get("plotly_chart") for text in leaves(json.loads(chart.proto.spec))]


def chart_titles(at: AppTest) -> list[str]:
    """Titles of the plotly charts on the page, in order."""
    return [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")]


def chart(at: AppTest, title: str) -> dict:
    """The figure dict of the chart with this title."""
    [figure] = [f for f in (json.loads(c.proto.spec) for c in at.get("plotly_chart")) if f["layout"]["title"]["text"] == title]
    return figure


def upload(at: AppTest, *files: tuple[str, bytes]) -> AppTest:
    """Put (name, bytes) files into the Results page's import widget and rerun."""
    at.file_uploader(key="results.upload").set_value([(name, data, "application/jsonl") for name, data in files])
    return at.run()


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
    at.run()
    assert not at.error, [e.value for e in at.error]  # e.g. a value above the server's limits: nothing would run
    return at
