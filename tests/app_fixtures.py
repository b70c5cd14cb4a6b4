"""Dashboard test helpers: synthetic v1 results and AppTest shortcuts.

Results are built with the engine's own ``results.new_result`` so they stay valid if the
schema grows; the Run-page tests and the browser test use the real engine instead.
"""
from __future__ import annotations

import json
import os

import pytest
from streamlit.testing.v1 import AppTest

from engine.config import GIB, BenchConfig
from engine.results import new_result
from engine.store import Store

CPU_ENV = {"device_type": "cpu", "device_name": "Test CPU", "capacity_bytes": 16 * GIB, "torch": "2.13.0",
           "cuda": None, "driver": None, "python": "3.11.7", "cpu": "Test CPU"}
H100_ENV = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "capacity_bytes": 80 * GIB,
            "torch": "2.13.0", "cuda": "12.8", "driver": "570.00", "python": "3.11.7", "cpu": "Xeon"}


def _summary(median: float) -> dict:
    return {"median": median, "p10": median * 0.95, "p90": median * 1.1, "iqr_rel": 0.05}


def make_result(status: str = "ok", env: dict | None = None, sweep_id: str | None = None, **fields) -> dict:
    """A result for ``BenchConfig(**fields)`` (device cpu) with numbers that scale with batch."""
    config = BenchConfig(**{"device": "cpu", **fields})
    env = env or CPU_ENV
    if status != "ok":
        return new_result(config, status, env, error=f"{status}: synthetic failure", sweep_id=sweep_id)
    batch = config.effective_batch
    factor = {"fp32": 1.0, "bf16": 0.6, "fp16": 0.6}[config.precision] * (1.3 if config.ckpt != "none" else 1.0)
    forward, backward, optimizer = 2.0 * batch * factor, 4.0 * batch * factor, 1.5
    step = forward + backward + optimizer
    activations = batch * 64 * 2**20 * (0.3 if config.ckpt != "none" else 1.0)
    breakdown = {"params": 20 * 2**20, "grads": 20 * 2**20, "optimizer": 40 * 2**20,
                 "activations": int(activations), "other": 2**20}
    metrics = {
        "step_ms": _summary(step), "forward_ms": _summary(forward), "backward_ms": _summary(backward),
        "optimizer_ms": _summary(optimizer),
        "samples_per_s": batch / step * 1000, "tokens_per_s": batch * 128 / step * 1000,
        "peak_allocated_bytes": sum(breakdown.values()), "peak_reserved_bytes": None, "nvml_used_bytes": None,
        "memory_breakdown_bytes": breakdown, "flops_per_step": 1e9 * batch, "hw_flops_per_step": 1.3e9 * batch,
        "mfu": None, "loss_scale": None, "skipped_steps": None, "energy_j_per_sample": None,
    }
    samples = {key: [metrics[key]["median"]] * 3 for key in ("step_ms", "forward_ms", "backward_ms", "optimizer_ms")}
    return new_result(config, status, env, metrics=metrics, samples=samples, sweep_id=sweep_id)


def make_sweep(sweep_id: str = "sweep-1", batches=(1, 2, 4), precisions=("fp32", "bf16"), oom_batch: int | None = None,
               env: dict | None = None) -> list[dict]:
    """A batch × precision sweep of gpt-tiny; ``oom_batch`` runs fail with OOM."""
    return [make_result("oom" if b == oom_batch else "ok", env=env, sweep_id=sweep_id, batch=b, precision=p)
            for p in precisions for b in batches]


# --------------------------------------------------------------------------- AppTest helpers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "app", "main.py")
# Generous: the first script run imports torch and plotly; a slow CI machine must not flake.
APP_TIMEOUT_S = 60


@pytest.fixture
def app_db(tmp_path, monkeypatch) -> Store:
    """An empty store at a temporary TRADEOFF_LAB_DB (device-queue locks go next to it)."""
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("TRADEOFF_LAB_DB", str(path))
    return Store(path)


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
