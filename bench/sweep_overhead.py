"""Sweep overhead: wall time of a sweep of 8 tiny CPU configs minus their measured steps.

Everything that is not a timed step counts as overhead: starting the worker (once), building
each model, warm-up, the instrumented memory and FLOP steps, and the IPC between caller and
worker. Target: <= 1 s per config with the warm worker.

    python bench/sweep_overhead.py
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.sweep import expand, run_sweep  # noqa: E402

TINY_DIMS = {"n_layers": 2, "seq_len": 64, "d_model": 64, "n_heads": 2, "vocab": 512}
BASE = {"model": "gpt-tiny", "overrides": TINY_DIMS, "device": "cpu", "warmup": 1, "steps": 5}
GRID = {"batch": [1, 2, 4, 8], "ckpt": ["none", "full"]}


def main() -> None:
    configs, _ = expand(BASE, GRID)
    # Wall time between progress events, charged to the phase of the event that ends it,
    # shows where the overhead goes; "queued" (waiting for another benchmark on this CPU)
    # is not the engine's overhead and is taken out.
    phase_s: dict[str, float] = defaultdict(float)
    last = [0.0]

    def progress(event: dict) -> None:
        now = time.perf_counter()
        phase_s[event.phase] += now - last[0]
        last[0] = now

    def on_result(result: dict) -> None:
        now = time.perf_counter()
        phase_s["result"] += now - last[0]
        last[0] = now

    # Start the shared worker with one config outside the timed sweep: the target is the
    # per-config overhead of a warm worker; the one-off start is printed separately.
    started = time.perf_counter()
    run_sweep(configs[:1])
    cold_s = time.perf_counter() - started

    started = last[0] = time.perf_counter()
    results = run_sweep(configs, progress, on_result)
    wall_s = time.perf_counter() - started

    failed = [r for r in results if not r.ok]
    if failed:
        sys.exit(f"{len(failed)} config(s) failed: {failed[0]['error']}")
    measured_s = sum(sum(r.samples["step_ms"]) / 1000 for r in results)
    queued_s = phase_s.pop("queued", 0.0)
    phase_s["measure"] -= measured_s
    overhead_s = wall_s - queued_s - measured_s
    n = len(results)
    print(f"configs: {n} (gpt-tiny {TINY_DIMS}, batch x ckpt, warmup {BASE['warmup']}, steps {BASE['steps']}, cpu)")
    print(f"wall: {wall_s:.2f} s   measured steps: {measured_s:.2f} s   queued behind others: {queued_s:.2f} s")
    print(f"overhead: {overhead_s:.2f} s total, {overhead_s / n:.2f} s per config (target <= 1 s)")
    print("overhead per config by phase: " + ", ".join(f"{name} {seconds / n:.3f} s" for name, seconds in phase_s.items()))
    print(f"(not counted: starting the worker plus a first config, {cold_s:.2f} s, once per process)")


if __name__ == "__main__":
    main()
