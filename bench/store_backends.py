"""Store speed on both backends: storing one run (``Store.add``, what a benchmark does after
each measured config) and listing 1,000 runs (``Store.list``, what the Results and Compare
pages do on every rerun), on a SQLite file and on a PostgreSQL database, in one run.

The runs are copies of the recorded demo runs (real results, so every stored JSON object has
its real size). Without ``--url`` a throw-away local PostgreSQL server is started with its
default durability (fsync and synchronous commit on, as a team's server would have; the
tests turn them off), so both backends wait for the disk at each commit. Each store call
opens its own connection, so the figures include connecting (a local TCP login for
PostgreSQL). The two backends are timed in turn, so a change in the machine's load hits both
alike. Prints the median of ``--repeats`` timings per operation and the ratio.

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


def timed_ms(call) -> float:
    """Wall time of ``call()`` in ms."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def report(runs: int, repeats: int, url: str) -> None:
    """Fill both stores with ``runs`` runs, then time each operation on the two backends in
    turn, ``repeats`` times after one untimed round (alternating, so a change in the
    machine's load hits both alike), and print the medians and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"SQLite": Store(os.path.join(tmp, "runs.sqlite")), "PostgreSQL": Store(url)}
        fresh = {name: iter(copies(repeats + 1)) for name in stores}
        for store in stores.values():
            store.add_many(copies(runs))
            assert len(store.list()) == runs
        operations = {"add one run": lambda name: stores[name].add(next(fresh[name])),
                      f"list {runs} runs": lambda name: stores[name].list(limit=runs)}
        times = {(op, name): [] for op in operations for name in stores}
        for round_ in range(repeats + 1):
            for op, call in operations.items():
                for name in stores:
                    elapsed = timed_ms(lambda: call(name))
                    if round_:
                        times[op, name].append(elapsed)
    print(f"median of {repeats} (ms)        SQLite  PostgreSQL  PostgreSQL/SQLite")
    for op in operations:
        sqlite, postgres = (statistics.median(times[op, name]) for name in stores)
        print(f"{op:<24}{sqlite:>9.2f}{postgres:>12.2f}{postgres / sqlite:>18.2f}")


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
