"""Store speed on both backends: storing one run (``Store.add``, what a benchmark does after
each measured config) and listing 1,000 runs (``Store.list``, what the Results and Compare
pages do on every rerun), on a SQLite file and on a PostgreSQL database, in one run.

The runs are copies of the recorded demo runs (real results, so every stored JSON object has
its real size). Without ``--url`` a throw-away local PostgreSQL server is started with its
default durability (fsync and synchronous commit on, as a team's server would have; the
tests turn them off), so both backends wait for the disk at each commit. Each store call
opens its own connection, so the figures include connecting (a local TCP login for
PostgreSQL). Prints the median of ``--repeats`` timings per operation and the ratio.

    python3 bench/store_backends.py [--runs 1000] [--repeats 21] [--url postgresql://...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from app.storage import DEMO_DIR  # noqa: E402
from engine.results import Result, read_results  # noqa: E402
from engine.store import Store  # noqa: E402
from tests.pg_server import missing, running_server  # noqa: E402


def copies(n: int) -> list[Result]:
    """``n`` copies of the demo runs with fresh ids, a minute apart."""
    demo = [r for path in sorted(DEMO_DIR.glob("*.jsonl")) for r in read_results(path)]
    start = datetime.now(timezone.utc) - timedelta(days=30)
    return [demo[i % len(demo)].replace(id=uuid.uuid4().hex, created_at=(start + timedelta(minutes=i)).isoformat())
            for i in range(n)]


def median_ms(call, repeats: int) -> float:
    """Median wall time of ``call()`` in ms, after one untimed call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(target: str, runs: int, repeats: int) -> dict[str, float]:
    """Median ms of adding one run and of listing ``runs`` runs on the store at ``target``."""
    store = Store(target)
    store.add_many(copies(runs))
    one = iter(copies(repeats + 1))
    listed = len(store.list())
    assert listed == runs, listed
    return {"add one run": median_ms(lambda: store.add(next(one)), repeats),
            f"list {runs} runs": median_ms(lambda: store.list(limit=runs), repeats)}


def report(runs: int, repeats: int, url: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = measure(os.path.join(tmp, "runs.sqlite"), runs, repeats)
    postgres = measure(url, runs, repeats)
    print(f"median of {repeats} (ms)        SQLite  PostgreSQL  PostgreSQL/SQLite")
    for operation in sqlite:
        print(f"{operation:<24}{sqlite[operation]:>9.2f}{postgres[operation]:>12.2f}"
              f"{postgres[operation] / sqlite[operation]:>18.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs stored, then listed (default 1000)")
    parser.add_argument("--repeats", type=int, default=21, help="timings per operation (default 21)")
    parser.add_argument("--url", help="an empty PostgreSQL database to use instead of a throw-away local server")
    args = parser.parse_args()
    if args.url:
        report(args.runs, args.repeats, args.url)
        return
    why = missing()
    if why:
        sys.exit(f"{why}; or give --url")
    with running_server(durable=True) as server:
        report(args.runs, args.repeats, server.create_database())


if __name__ == "__main__":
    main()
