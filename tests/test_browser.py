"""Real-browser tests against one `streamlit run app/main.py` server: a shared link, "Run
benchmark", three charts; and every page (and the HTML report) with hostile runs stored and a
hostile link, making no request to another host and drawing no link to one.

Drives Debian's chromium headless through Playwright for Python. Skipped where
/usr/bin/chromium (or playwright) is missing, unless TRADEOFF_LAB_REQUIRE_BROWSER=1 (CI),
where a missing browser is a failure.
"""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import re
import urllib.parse
import urllib.request

import pytest

from app import storage
from app.charts import runs as run_charts
from engine.store import Store

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the test itself: skip, or fail where the browser is required
    sync_playwright = None
from tests.app_fixtures import ROOT, make_result
from tests.hostile import MARKDOWN_IMAGE, MARKDOWN_LINK, payload_results

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
OUTPUT_DIR = os.path.join(ROOT, "test-output", "browser")
# Where the README's screenshots are refreshed from, when set (docs/screenshots).
SCREENSHOTS = os.environ.get("TRADEOFF_LAB_SCREENSHOTS")
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


def screenshot(page, name: str) -> None:
    """Save what the browser shows under the test's output folder (and SCREENSHOTS, if set)."""
    for folder in filter(None, (OUTPUT_DIR, SCREENSHOTS)):
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=os.path.join(folder, f"{name}.png"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The dashboard on a free localhost port with a temporary database, shared by this
    module's tests (a server start costs seconds); yields (url, db path)."""
    yield from _serve(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """A second dashboard whose database holds the demo data (and nothing else)."""
    tmp_path = tmp_path_factory.mktemp("demo-server")
    storage.load_demo(Store(str(tmp_path / "runs.sqlite")))
    yield from _serve(tmp_path)


def _serve(tmp_path):
    port = _free_port()
    db = tmp_path / "runs.sqlite"
    env = {**os.environ, "TRADEOFF_LAB_DB": str(db), "TRADEOFF_LAB_LOCK_DIR": str(tmp_path / "locks"),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
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
            page.wait_for_timeout(500)
            page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
            screenshot(page, "run")
        finally:
            browser.close()
    # The server's database is this module's: the run is the one with the link's settings.
    [result] = [r for r in Store(db).list() if r.config.steps == 2]
    assert result.status == "ok", result.error
    assert result.config.batch == 2 and result.config.model == "gpt-tiny"


# Every address in the page's DOM that a click or a load would go to: HTML links and images,
# and plotly's SVG links (xlink:href).
_ADDRESSES_JS = """() => Array.from(document.querySelectorAll('a, img, image, script, link, iframe')).map(e =>
    e.getAttribute('href') || e.getAttributeNS('http://www.w3.org/1999/xlink', 'href') || e.getAttribute('src') || '')"""
# page (its navigation link) -> what shows it is drawn
_PAGES = {"Compare": ".js-plotly-plot .gtitle", "Decide": '[role="tab"]', "Results": '[data-testid="stDataFrame"]',
          "Talk": 'h1:has-text("Why is my training slow")', "Device": 'h1:has-text("Device")'}


def test_hostile_runs_and_links_make_no_request_to_another_host(browser_available, server):
    """Runs whose device name, model, error and warnings carry Markdown images and links, HTML
    tags and formulas, and a link whose precision is a Markdown link: every page shows them as
    text, fetches nothing from another host and links to none. (The HTML report's markup is
    checked without a browser, in test_app_results.py.)"""
    url, db = server
    Store(db).add_many([make_result(model=f"{MARKDOWN_IMAGE}:build"), *payload_results()])  # newest: a hostile OOM
    foreign: list[str] = []

    def only_this_server(route) -> None:
        if urllib.parse.urlsplit(route.request.url).hostname in ("localhost", "127.0.0.1"):
            route.continue_()
        else:  # recorded, and never sent
            foreign.append(route.request.url)
            route.abort()

    def addresses(page) -> list[str]:
        return [a for a in page.evaluate(_ADDRESSES_JS) if "invalid" in a]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.route("**/*", only_this_server)
            page.goto(f"{url}/?{urllib.parse.urlencode({'precision': MARKDOWN_LINK})}")
            page.get_by_text("ignored", exact=False).first.wait_for(timeout=START_TIMEOUT_S * 1000)
            # The link's value, as written (word joiners are invisible).
            body = page.inner_text("body").replace("\u2060", "")
            assert f"precision={MARKDOWN_LINK!r} ignored" in body
            assert not addresses(page), addresses(page)
            for name, drawn in _PAGES.items():  # through the app's navigation, as a user moves on
                page.get_by_role("link", name=name).click()
                page.locator(drawn).first.wait_for(timeout=60_000)
                page.wait_for_timeout(300)  # anything the drawn page would fetch has been asked for
                assert not addresses(page), (name, addresses(page))
        finally:
            browser.close()
    assert not foreign, foreign


@contextlib.contextmanager
def browser_page(width: int, height: int):
    """A page of a fresh headless Chromium with a ``width`` × ``height`` viewport."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


_PLOT_AREAS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(p => {
    const r = p.querySelector('.nsewdrag').getBoundingClientRect();
    return {title: p.querySelector('.gtitle').textContent, left: r.left, top: r.top, right: r.right, bottom: r.bottom,
            ticks: Array.from(p.querySelectorAll('.xtick text')).map(t => t.textContent)}; })"""
MAIN_TITLES = ("Throughput", "Peak memory", "Backward time")


def _main_charts(page) -> list[dict]:
    for title in MAIN_TITLES:
        page.locator(".js-plotly-plot .gtitle", has_text=title).first.wait_for(timeout=START_TIMEOUT_S * 1000)
    page.wait_for_timeout(800)  # plotly's last relayout (automargin) after the first draw
    return [area for area in page.evaluate(_PLOT_AREAS_JS) if area["title"] in MAIN_TITLES][:3]


def test_a_link_with_dimensions_warmup_and_a_sweep_restores_them_and_the_runs_carry_them(browser_available, server):
    url, db = server
    dims = {"seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 2, "vocab": 256}
    link = {"model": "gpt-tiny", **dims, "warmup": 1, "steps": 3, "sweep": "batch", "sweep_batch": "1,2"}
    with browser_page(1600, 1200) as page:
        page.goto(f"{url}/?{urllib.parse.urlencode(link)}")
        page.get_by_text("Settings from a shared link").wait_for(timeout=START_TIMEOUT_S * 1000)
        # The form draws its inputs, then their values: waited for, not read mid-draw.
        expect(page.get_by_label("Warm-up steps (not measured)", exact=True)).to_have_value("1")
        expect(page.get_by_label("batch values", exact=True)).to_have_value("1,2")
        expect(page.get_by_text("Not run yet: no stored run")).to_be_visible()
        page.get_by_role("button", name="Run benchmark").click()
        page.get_by_text("Finished 2 of 2 run(s)").wait_for(timeout=RUN_TIMEOUT_S * 1000)
        # The address bar still names every part of the link.
        address = urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)
        assert {key: address[key][0] for key in link} == {key: str(value) for key, value in link.items()}
    runs = [r for r in Store(str(db)).list() if r.config.steps == 3]
    assert sorted(r.config.batch for r in runs) == [1, 2] and {r.status for r in runs} == {"ok"}
    assert all(r.config.overrides == dims and r.config.warmup == 1 for r in runs)
    assert len({r.sweep_id for r in runs}) == 1


def test_presentation_mode_keeps_the_three_main_charts_on_a_1280x720_projector(browser_available, demo_server):
    url, _ = demo_server
    with browser_page(1280, 720) as page:
        page.goto(f"{url}/compare?present=1")
        areas = _main_charts(page)
        assert [a["title"] for a in areas] == list(MAIN_TITLES)
        for area in areas:  # plot areas fully visible without scrolling
            assert area["top"] >= 0 and area["bottom"] <= 720 and area["right"] <= 1280, area
        screenshot(page, "compare-present")
        page.reload()  # the mode lives in the URL
        assert "present=1" in page.url
        areas = _main_charts(page)
        assert all(a["bottom"] <= 720 for a in areas)


def test_at_800_pixels_every_run_label_is_there_and_the_charts_stack(browser_available, demo_server):
    url, db = demo_server
    store = Store(str(db))
    latest = store.list(sweep_id=store.list()[0].sweep_id)
    expected = list(dict.fromkeys(run_charts.group_labels(sorted(latest, key=lambda r: r.created_at))))
    with browser_page(800, 1000) as page:
        page.goto(f"{url}/compare")
        areas = _main_charts(page)
        for area in areas:
            assert area["ticks"] == expected, area
        # One chart per row: each starts below the one before.
        assert areas[0]["bottom"] < areas[1]["top"] and areas[1]["bottom"] < areas[2]["top"]
        screenshot(page, "compare-800px")


def test_the_talk_walks_through_five_chapters_on_demo_data(browser_available, demo_server):
    url, _ = demo_server
    with browser_page(1600, 1000) as page:
        page.goto(f"{url}/talk")
        for number in range(1, 6):
            page.get_by_text(f"Chapter {number} of 5").wait_for(timeout=START_TIMEOUT_S * 1000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            # The address bar follows the page a moment later: waited for, not read mid-update.
            expect(page).to_have_url(re.compile(rf"[?&]chapter={number}(&|$)"))
            if number == 2:
                screenshot(page, "talk")
            if number < 5:
                page.get_by_role("button", name="Next →").click()
