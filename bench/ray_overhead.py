"""Ray's cost per configuration: the same sweep of 4 tiny CPU configs through the local
executor and through a Ray started on this machine, in one process, alternating rounds.

A config's time is the gap between its result and the one before it (the first from the
sweep's start): with one device both executors finish configs one at a time (Ray's tasks
start together but wait in the machine's device queue), so the gap is what one config costs.
Its overhead is that gap less its measured steps. Both executors run warm (a full untimed
sweep each first); starting Ray is reported on its own. Medians over every config of every
round, and Ray's over local's.

    python bench/ray_overhead.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Ray gives each task OMP_NUM_THREADS=1 unless it is set: set it for both executors so the
# runs compute alike and only the executor differs (each result records its cpu_threads).
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

from engine.dispatch import LocalExecutor  # noqa: E402
from engine.ray_executor import RayExecutor  # noqa: E402
from engine.sweep import expand, run_sweep  # noqa: E402

TINY_DIMS = {"n_layers": 1, "seq_len": 32, "d_model": 64, "n_heads": 2, "vocab": 512}
BASE = {"model": "gpt-tiny", "overrides": TINY_DIMS, "device": "cpu", "warmup": 1, "steps": 3}
GRID = {"batch": [1, 2, 4, 8]}


def timed_sweep(configs, executor) -> list[tuple[float, float, int]]:
    """(gap since the previous result, measured step time, cpu threads) per config, seconds."""
    rows, last = [], [time.perf_counter()]

    def on_result(result) -> None:
        now = time.perf_counter()
        if not result.ok:
            sys.exit(f"a config failed: {result.status}: {result.error}")
        rows.append((now - last[0], sum(result.samples["step_ms"]) / 1000, result.env.cpu_threads))
        last[0] = now

    run_sweep(configs, on_result=on_result, executor=executor)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed sweeps per executor (default 3)")
    args = parser.parse_args()
    configs, _ = expand(BASE, GRID)
    local, ray = LocalExecutor(), RayExecutor()

    started = time.perf_counter()
    ray.connect()
    ray_start_s = time.perf_counter() - started
    for executor in (local, ray):  # warm: worker processes started, torch imported
        timed_sweep(configs, executor)

    rows: dict[str, list] = {"local": [], "ray": []}
    for _ in range(args.rounds):
        rows["local"] += timed_sweep(configs, local)
        rows["ray"] += timed_sweep(configs, ray)

    print(f"configs: {len(configs)} (gpt-tiny {TINY_DIMS}, batch {GRID['batch']}, warmup {BASE['warmup']}, "
          f"steps {BASE['steps']}, cpu), {args.rounds} rounds each, alternating; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    medians = {}
    for name, got in rows.items():
        wall = statistics.median(gap for gap, _, _ in got)
        overhead = statistics.median(gap - steps for gap, steps, _ in got)
        threads = sorted({t for _, _, t in got})
        medians[name] = (wall, overhead)
        print(f"{name:>5}: per config {wall:.3f} s, of which not measured steps {overhead:.3f} s "
              f"(medians of {len(got)}; torch threads {threads})")
    (local_wall, local_over), (ray_wall, ray_over) = medians["local"], medians["ray"]
    print(f"ray / local: {ray_wall / local_wall:.2f}x per config; Ray adds {ray_over - local_over:+.3f} s per config")
    print(f"(not counted: starting Ray on this machine, {ray_start_s:.1f} s, once per sweep command)")


if __name__ == "__main__":
    main()
