"""Chart time against the number of failed runs (target: a 1,000-run sweep with 900 failures
renders in <= 2 s).

Failed runs are drawn as one trace whatever their number; one annotation per failed run
made the time grow with its square (250 failed runs 4 s, 1,000 78 s). Measures:

1. build: the per-run figures of one sweep (Throughput, Peak memory, Backward time, both
   breakdowns, throughput against batch) built and serialised as Streamlit sends them, for
   250 runs that all failed and for 1,000 runs of which 900 failed, with the number of traces
   and annotations (flat however many failed); median of several builds;
2. render: one rerun of the Run page (its latest sweep) and of the Compare page with that
   1,000-run sweep stored, through streamlit.testing's AppTest, median after a warm-up run.

The runs are copies of a real recorded demo run (ok ones as recorded, failed ones as OOMs of
the same configuration with a larger batch), so every stored JSON object has its real size.

    python bench/chart_failures.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from app.charts import runs as run_charts  # noqa: E402
from app.storage import DEMO_DIR  # noqa: E402
from engine.results import Result, read_results  # noqa: E402
from engine.store import Store  # noqa: E402

TARGET_S = 2.0
SIZES = ((250, 250), (1000, 900))  # (runs, failed runs)


def sweep(runs: int, failed: int) -> list[Result]:
    """One sweep over the micro-batch: ``runs`` runs, the last ``failed`` of them OOMs."""
    template = next(r for path in sorted(DEMO_DIR.glob("*.jsonl")) for r in read_results(path) if r.ok)
    sweep_id = uuid.uuid4().hex
    out = []
    for i in range(runs):
        config = template.config.replace(batch=i + 1, accum=1)
        if i < runs - failed:
            out.append(template.replace(id=uuid.uuid4().hex, config=config, sweep_id=sweep_id))
        else:
            out.append(Result.new(config, "oom", template.env, error="OutOfMemoryError: CUDA out of memory.",
                                  sweep_id=sweep_id))
    return out


def figures(results: list[Result]) -> list:
    """The per-run figures the Compare page draws for a sweep over the micro-batch."""
    return [build(results) for build in run_charts.MAIN_CHARTS] + [
        run_charts.build_phase_breakdown(results), run_charts.build_memory_breakdown(results),
        run_charts.build_sweep_lines(results, "batch", "throughput")]


def build_times(repeats: int) -> None:
    for runs, failed in SIZES:
        results = sweep(runs, failed)
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            built = [fig.to_json() for fig in figures(results)]  # serialised, as st.plotly_chart does
            samples.append(time.perf_counter() - began)
        built = figures(results)
        traces = max(len(fig.data) for fig in built)
        annotations = max(len(fig.layout.annotations) for fig in built)
        print(f"build   {runs:>5} runs, {failed:>4} failed: {statistics.median(samples):.3f} s for {len(built)} figures "
              f"(min {min(samples):.3f}, n={repeats}); at most {traces} traces and {annotations} annotations per figure")


def render_times(repeats: int) -> None:
    from streamlit.testing.v1 import AppTest

    runs, failed = SIZES[-1]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRADEOFF_LAB_DB"] = os.path.join(tmp, "runs.sqlite")
        os.environ["TRADEOFF_LAB_LOCK_DIR"] = os.path.join(tmp, "locks")
        Store().add_many(sweep(runs, failed))
        for name, path in (("Run", None), ("Compare", "views/compare.py")):
            at = AppTest.from_file(os.path.join(ROOT, "app", "main.py"), default_timeout=300)
            at.run()  # warm-up: imports, caches
            if path:
                at.switch_page(path).run()
            assert not at.exception, [e.value for e in at.exception]
            assert at.get("plotly_chart"), f"the {name} page drew no chart"
            samples = []
            for _ in range(repeats):
                began = time.perf_counter()
                at.run()
                samples.append(time.perf_counter() - began)
            median = statistics.median(samples)
            print(f"render  {name:<8} page, {runs} runs, {failed} failed: median {median:.3f} s (min {min(samples):.3f}, "
                  f"max {max(samples):.3f}, n={repeats})  target <= {TARGET_S:g} s: "
                  f"{'ok' if median <= TARGET_S else 'OVER TARGET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    build_times(args.repeats)
    render_times(args.repeats)


if __name__ == "__main__":
    main()
