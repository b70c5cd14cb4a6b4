"""Render time of the Results and Compare pages with 1,000 stored runs (target: < 2 s each).

Fills a temporary store with copies of the demo runs (real recorded results, so every JSON
object has its real size) under fresh ids, one sweep per copy of the demo set, then measures:

1. script time: one rerun of each page through streamlit.testing's AppTest (the Python side,
   which is what grows with the number of stored runs), median of several reruns after a
   warm-up run;
2. in a browser (if /usr/bin/chromium and playwright are present), on a real `streamlit run`
   server, until the page's content is drawn (the table for Results, all seven charts for
   Compare): (a) a fresh page load by URL, with the nearly empty Device page as the baseline
   that every fresh load pays (Streamlit's frontend, the websocket session), with an empty
   browser cache; (b) a reload by a returning user (warm HTTP cache, new session); (c) a click
   on the page in the app's navigation, as a user moves between pages. Medians of several tries.

    python bench/app_render.py [--runs 1000] [--repeats 5] [--no-browser]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from app.storage import DEMO_DIR  # noqa: E402
from engine.results import read_results  # noqa: E402
from engine.store import Store  # noqa: E402

TARGET_S = 2.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# page -> (url path, selector of what shows the page is drawn, how many of them)
PAGES = {"Results": ("results", '[data-testid="stDataFrame"]', 1),
         "Compare": ("compare", ".js-plotly-plot .gtitle", 7)}
BASELINE = {"Device": ("device", 'h1:has-text("Device")', 1)}


def fill(store: Store, n: int) -> None:
    """``n`` runs: copies of the demo runs with fresh ids, one sweep per copy of the set."""
    demo = [r for path in sorted(DEMO_DIR.glob("*.jsonl")) for r in read_results(path)]
    start = datetime.now(timezone.utc) - timedelta(days=30)
    runs = []
    while len(runs) < n:
        sweep_id = uuid.uuid4().hex
        for template in demo[: n - len(runs)]:
            runs.append(template.replace(id=uuid.uuid4().hex, sweep_id=sweep_id,
                                         created_at=(start + timedelta(minutes=len(runs))).isoformat()))
    store.add_many(runs)


def script_times(repeats: int) -> dict[str, list[float]]:
    """Seconds per rerun of each page's script (AppTest), after one warm-up run."""
    from streamlit.testing.v1 import AppTest

    times = {}
    for name, (path, _, _) in PAGES.items():
        at = AppTest.from_file(os.path.join(ROOT, "app", "main.py"), default_timeout=120)
        at.run()
        at.switch_page(f"views/{path}.py").run()  # warm-up: imports, caches
        assert not at.exception, [e.value for e in at.exception]
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            at.run()
            samples.append(time.perf_counter() - began)
        times[name] = samples
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def browser_times(db: str, repeats: int) -> tuple[dict[str, list[float]], ...]:
    """Seconds until each page's content is drawn in headless Chromium: (fresh loads with an
    empty cache, reloads with a warm cache, clicks in the navigation)."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "TRADEOFF_LAB_DB": db, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
                               "--server.headless", "true"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://localhost:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        fresh: dict[str, list[float]] = {}
        reloads: dict[str, list[float]] = {}
        clicks: dict[str, list[float]] = {}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            app = browser.new_page(viewport={"width": 1600, "height": 1200})
            app.goto(url)  # the first session of a server pays for imports
            app.get_by_role("button", name="Run benchmark").wait_for(timeout=120_000)
            for name, (path, selector, count) in {**BASELINE, **PAGES}.items():
                fresh[name] = []
                for _ in range(repeats):
                    page = browser.new_page(viewport={"width": 1600, "height": 1200})
                    began = time.perf_counter()
                    page.goto(f"{url}/{path}")
                    page.locator(selector).nth(count - 1).wait_for(timeout=60_000)
                    fresh[name].append(time.perf_counter() - began)
                    page.close()
            # A returning user: the same browser context, so Streamlit's and plotly's
            # JavaScript come from the HTTP cache; a new session still renders from scratch.
            returning = browser.new_context(viewport={"width": 1600, "height": 1200})
            page = returning.new_page()
            for name, (path, selector, count) in {**BASELINE, **PAGES}.items():
                page.goto(f"{url}/{path}")
                page.locator(selector).nth(count - 1).wait_for(timeout=60_000)
                reloads[name] = []
                for _ in range(repeats):
                    began = time.perf_counter()
                    page.reload()
                    page.locator(selector).nth(count - 1).wait_for(timeout=60_000)
                    reloads[name].append(time.perf_counter() - began)
            returning.close()
            for _ in range(repeats):
                for name, (_, selector, count) in {**PAGES, **BASELINE}.items():
                    began = time.perf_counter()
                    app.get_by_role("link", name=name).click()
                    app.locator(selector).nth(count - 1).wait_for(timeout=60_000)
                    clicks.setdefault(name, []).append(time.perf_counter() - began)
            browser.close()
        return fresh, reloads, clicks
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def report(kind: str, times: dict[str, list[float]]) -> None:
    for name, samples in times.items():
        median = statistics.median(samples)
        verdict = "baseline" if name in BASELINE else "ok" if median < TARGET_S else "OVER TARGET"
        print(f"{kind:>8}  {name:<8} median {median:.3f} s  (min {min(samples):.3f}, max {max(samples):.3f}, "
              f"n={len(samples)})  target < {TARGET_S:g} s: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-browser", action="store_true", help="only the script time (AppTest)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "runs.sqlite")
        os.environ["TRADEOFF_LAB_DB"] = db
        store = Store(db)
        fill(store, args.runs)
        print(f"{store.count()} stored runs; latest sweep has {len(store.list(sweep_id=store.latest_sweep_id()))} runs")
        report("script", script_times(args.repeats))
        if args.no_browser:
            return
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            print("browser: skipped (playwright is not installed)")
            return
        if not os.path.exists(CHROMIUM):
            print(f"browser: skipped ({CHROMIUM} is missing)")
            return
        fresh, reloads, clicks = browser_times(db, args.repeats)
        report("load", fresh)
        report("reload", reloads)
        report("click", clicks)


if __name__ == "__main__":
    main()
