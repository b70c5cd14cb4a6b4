"""One real-browser test: `streamlit run app/main.py`, a shared link, "Run benchmark", three charts.

Drives Debian's chromium headless through Playwright for Python. Skipped where
/usr/bin/chromium (or playwright) is missing, unless TRADEOFF_LAB_REQUIRE_BROWSER=1 (CI),
where a missing browser is a failure.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from engine.store import Store

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # reported by the test itself: skip, or fail where the browser is required
    sync_playwright = None
from tests.app_fixtures import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
OUTPUT_DIR = os.path.join(ROOT, "test-output", "browser")
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240

pytestmark = pytest.mark.browser


def _need(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("TRADEOFF_LAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why}, and TRADEOFF_LAB_REQUIRE_BROWSER=1 requires the browser test")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser_available() -> None:
    """Skip (or fail, where required) before starting anything when the browser is missing."""
    _need(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    _need(sync_playwright is not None, "playwright is not installed (pip install playwright)")


@pytest.fixture
def server(tmp_path):
    """The dashboard on a free localhost port with a temporary database; yields (url, db path)."""
    port = _free_port()
    db = tmp_path / "runs.sqlite"
    env = {**os.environ, "TRADEOFF_LAB_DB": str(db), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    log = open(tmp_path / "streamlit.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
         "--server.address", "localhost", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "streamlit.log").read_text()
            assert time.monotonic() < deadline, "streamlit did not start"
            time.sleep(0.3)
        yield url, db
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the benchmark worker it spawned
        process.wait(timeout=30)
        log.close()


def test_a_shared_link_runs_gpt_tiny_and_draws_the_three_charts(browser_available, server):
    url, db = server
    link = f"{url}/?model=gpt-tiny&batch=2&accum=1&precision=fp32&ckpt=none&steps=2"
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.goto(link)
            run_button = page.get_by_role("button", name="Run benchmark")
            run_button.wait_for(timeout=START_TIMEOUT_S * 1000)
            # The link's settings are in the form.
            assert page.get_by_label("Micro-batch size", exact=True).input_value() == "2"
            assert page.get_by_label("Measured steps", exact=True).input_value() == "2"
            run_button.click()
            for title in ("Throughput", "Peak memory", "Backward time"):
                page.locator(".js-plotly-plot .gtitle", has_text=title).first.wait_for(timeout=RUN_TIMEOUT_S * 1000)
            page.screenshot(path=os.path.join(OUTPUT_DIR, "run-page.png"), full_page=True)
        finally:
            browser.close()
    [result] = Store(db).list()
    assert result.status == "ok", result.error
    assert result.config.batch == 2 and result.config.steps == 2
