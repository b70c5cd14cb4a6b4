"""The Talk page's five chapters: "Why is my training slow, or out of memory?".

Each chapter makes one claim, draws one chart and draws its takeaway from real runs: the
ones measured on this machine when there are any ("run it live"), else the demo data (real
CPU recordings under app/demo/). A chapter names the runs it needs by their settings, so
live runs and demo runs are found the same way; its takeaway is computed from the runs it
shows, never written in advance, and says so when the runs it needs are missing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import plotly.graph_objects as go

from engine import frontier, gains
from engine.config import DESCRIBED_FIELDS, GIB, BenchConfig
from engine.results import Result

from .charts import decisions
from .charts import runs as run_charts
from .charts.common import chart_text, layout, precision_color
from .storage import DEMO_DIR

PITFALL_DEMO = DEMO_DIR / "pitfall-gpt-tiny-cpu.json"
# The settings every chapter's runs share (those of the demo recordings, so a live run of a
# chapter and the demo run of the same settings are told apart only by where they ran).
BASE = dict(model="gpt-tiny", warmup=5, steps=10, memory_cap_gib=0.5)
MIB = 2**20


def _config(**fields) -> BenchConfig:
    return BenchConfig(**{**BASE, **fields})


def talk_key(config: BenchConfig) -> tuple:
    """What makes two runs the same experiment for a chapter: model and dimensions, batch,
    accumulation, precision, checkpointing and the described fields (optimizer, attention...;
    not the device they ran on)."""
    return (config.model_label, config.batch, config.accum, config.precision, config.ckpt,
            *(getattr(config, f.name) for f in DESCRIBED_FIELDS))


def chapter_runs(configs: list[BenchConfig], runs: list[Result], host_id: str) -> list[Result]:
    """The newest run of each of ``configs``: one measured here when there is one, else one
    from the demo data; in the order of ``configs``, missing ones left out."""
    chosen = []
    for config in configs:
        matching = [r for r in runs if talk_key(r.config) == talk_key(config)]  # newest first
        here = [r for r in matching if frontier.measured_here(r, host_id)]
        demo = [r for r in matching if r.origin == "demo"]
        if here or demo:
            chosen.append((here or demo)[0])
    return chosen


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / MIB:.3g} MiB" if value < GIB else f"{value / GIB:.3g} GiB"


def _ok(results: list[Result]) -> list[Result]:
    return [r for r in results if r.ok]


# ------------------------------------------------------------------------ takeaways
def accumulation_takeaway(results: list[Result]) -> str:
    ok = sorted(_ok(results), key=lambda r: r.config.batch)
    if len(ok) < 2:
        return "Needs two runs at the same effective batch with different accumulation: run it live."
    small, large = ok[0], ok[-1]
    saving = 1 - small.metrics.peak_allocated_bytes / large.metrics.peak_allocated_bytes
    speed = small.metrics.samples_per_s / large.metrics.samples_per_s
    return (f"Effective batch {large.metrics.effective_batch} as {small.config.batch} × {small.config.accum} used "
            f"{_mib(small.metrics.peak_allocated_bytes)} against {_mib(large.metrics.peak_allocated_bytes)} as "
            f"{large.config.batch} × {large.config.accum}: {saving:.0%} less memory, at {speed:.0%} of the speed. "
            "The gradients are the same (the loss is divided by the accumulation steps; the engine's tests check "
            "it) except with BatchNorm, whose statistics only ever see one micro-batch.")


def memory_takeaway(results: list[Result]) -> str:
    ok = sorted((r for r in _ok(results) if r.metrics.memory_breakdown_bytes), key=lambda r: r.config.batch)
    if len(ok) < 2:
        return "Needs runs at two batch sizes: run it live."
    first, last = ok[0].metrics.memory_breakdown_bytes, ok[-1].metrics.memory_breakdown_bytes
    peak = ok[-1].metrics.peak_allocated_bytes
    training_only = last.grads + last.optimizer + last.activations
    return (f"At the peak, parameters ({_mib(last.params)}) and optimizer state ({_mib(last.optimizer)}; AdamW keeps two "
            f"numbers per parameter) are the same at every batch. Activations grow with it: {_mib(first.activations)} "
            f"at batch {ok[0].config.batch}, {_mib(last.activations)} at batch {ok[-1].config.batch}. Inference under "
            f"torch.no_grad() keeps no gradients, no optimizer state and no activations for backward: "
            f"{_mib(training_only)} of the {_mib(peak)} peak at batch {ok[-1].config.batch} is there only for training.")


def precision_takeaway(results: list[Result]) -> str:
    ok = _ok(results)
    rows = {row["id"]: row for row in gains.gain_rows(ok)}
    words = []
    for result in ok:
        row = rows.get(result.id)
        if result.config.precision == "fp32" or row is None or not row["speedup"]:
            continue
        words.append(f"{result.config.precision}: {row['speedup']:.2f}× the fp32 speed, gradients within "
                     f"{result.metrics.grad_rel_diff:.1e} of fp32's" if result.metrics.grad_rel_diff is not None
                     else f"{result.config.precision}: {row['speedup']:.2f}× the fp32 speed")
        if result.config.precision == "fp16" and result.metrics.loss_scale is not None:
            words[-1] += (f", loss scale {result.metrics.loss_scale:g} with {result.metrics.skipped_steps} "
                          "skipped step(s) (GradScaler skips a step whose gradients overflowed)")
    if not words:
        return "Needs an fp32 run and a mixed-precision run of the same settings: run it live."
    device = ok[0].env.device_type
    note = (" On a CPU without fast half-precision units, half precision can be slower than fp32: on a GPU with "
            "tensor cores it is typically the larger speed-up." if device == "cpu" else "")
    return "; ".join(words) + "." + note


def checkpointing_takeaway(results: list[Result]) -> str:
    ok = {r.config.ckpt: r for r in _ok(results) if r.config.precision == "fp32"}
    if "none" not in ok or "full" not in ok:
        return "Needs a run without and with checkpointing: run it live."
    none, full = ok["none"].metrics, ok["full"].metrics
    saved = 1 - full.peak_allocated_bytes / none.peak_allocated_bytes
    slower = full.backward_ms.median / none.backward_ms.median - 1
    noise = max(none.backward_ms.iqr_rel, full.backward_ms.iqr_rel)
    cost = (f"backward time changed by {slower:+.0%}, within the {noise:.0%} step-to-step noise here: no cost is "
            "visible at this size" if abs(slower) <= noise else f"backward took {slower:+.0%} longer, recomputing")
    return (f"In fp32, full checkpointing cut the peak from {_mib(none.peak_allocated_bytes)} to {_mib(full.peak_allocated_bytes)} "
            f"({saved:.0%} less); {cost}. It keeps only each block's input and recomputes the rest during backward: "
            "worth it when memory, not speed, is what stops you.")


def pitfall_takeaway(report: dict) -> str:
    naive, correct = report["naive"], report["correct"]
    share = {name: r["forward_ms"]["median"] / r["step_ms"]["median"] for name, r in (("naive", naive), ("correct", correct))}
    if report["asynchronous"]:
        return (f"The naive wall clock gave forward {share['naive']:.0%} of the step; device events give it "
                f"{share['correct']:.0%}. The host only launches GPU work: time it with CUDA events.")
    return (f"On this {report['device_type']} both clocks agree (forward {share['naive']:.0%} vs {share['correct']:.0%} "
            "of the step): the host waits for every operation. On a GPU it does not, and a naive clock puts the "
            "time wherever the host next waits. Run it live on a GPU to see it.")


# ------------------------------------------------------------------------ charts
def build_recompute_tradeoff(results: list[Result]) -> go.Figure:
    """Peak memory against backward time, one point per run (colour: precision), labelled
    with its checkpointing: memory bought with recompute time."""
    ok = _ok(results)
    fig = go.Figure()
    for precision in dict.fromkeys(r.config.precision for r in ok):
        mine = [r for r in ok if r.config.precision == precision]
        fig.add_scatter(name=precision, x=[r.metrics.backward_ms.median for r in mine],
                        y=[r.metrics.peak_allocated_bytes / MIB for r in mine], mode="markers+text",
                        marker=dict(size=16, color=precision_color(precision)),
                        text=[chart_text(run_charts.field_value(r, "ckpt")) for r in mine], textposition="top center",
                        hovertemplate="%{text}: backward %{x:.3g} ms, peak %{y:.3g} MiB<extra>%{fullData.name}</extra>")
    fig.update_xaxes(rangemode="tozero")
    fig.update_yaxes(rangemode="tozero")
    return layout(fig, "Memory bought with recompute time", x_title="backward time per step (ms)",
                  y_title="peak memory (MiB)", legend="below")


@dataclass(frozen=True)
class Chapter:
    """One claim, the runs it rests on (by their settings), one chart and a takeaway from them."""

    title: str
    claim: str
    configs: tuple[BenchConfig, ...]
    chart: Callable[[list[Result]], go.Figure]
    takeaway: Callable[[list[Result]], str]


# The first chapter rests on a timing-pitfall report (``engine.pitfall``), not on stored runs.
PITFALL_TITLE = "1. The timing illusion"
PITFALL_CLAIM = ("Your forward pass looks fast and your backward slow? On a GPU the host only queues work: a wall "
                 "clock without synchronisation times the queue, not the GPU.")
CHAPTERS = (
    Chapter("2. Gradient accumulation",
            "The same effective batch in smaller micro-batches needs a fraction of the memory and gives the same "
            "gradients.",
            tuple(_config(batch=b, accum=8 // b) for b in (1, 2, 4, 8)), run_charts.build_peak_memory,
            accumulation_takeaway),
    Chapter("3. Where memory goes",
            "Weights, gradients and optimizer state are fixed; activations grow with the batch.",
            tuple(_config(batch=b) for b in (2, 4, 8)), run_charts.build_memory_breakdown, memory_takeaway),
    Chapter("4. Mixed precision",
            "Lower precision buys speed and memory with a small, measurable numerical price.",
            tuple(_config(batch=8, precision=p) for p in ("fp32", "bf16", "fp16")), run_charts.build_throughput,
            precision_takeaway),
    Chapter("5. Activation checkpointing",
            "Checkpointing trades memory for time: activations are recomputed during backward instead of stored.",
            tuple(_config(batch=8, precision=p, ckpt=c) for p in ("fp32", "bf16") for c in ("none", "full")),
            build_recompute_tradeoff, checkpointing_takeaway),
)


def demo_pitfall() -> dict:
    """The timing-pitfall report recorded with the demo data (on a CPU; see app/demo/README.md)."""
    return json.loads(PITFALL_DEMO.read_text(encoding="utf-8"))


def pitfall_chart(report: dict) -> go.Figure:
    """Chapter 1's chart: both clocks side by side (``decisions.build_pitfall``)."""
    return decisions.build_pitfall(report)
