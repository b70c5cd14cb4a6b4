"""Page sections more than one page shows: the batch finder (Run and Decide pages) and the
numerical cost of each saving beside its speed and memory gain (Compare and Decide pages)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import form, storage, ui
from app.charts import decisions
from app.tasks import Task, task_button
from engine import finder, gains
from engine.config import GIB, BenchConfig
from engine.results import Result


def gib(value) -> str:
    """Bytes as GiB text, "–" when unknown."""
    return "–" if value is None else f"{value / GIB:,.3f} GiB" if value < 10 * GIB else f"{value / GIB:,.1f} GiB"


def percent(fraction: float | None) -> float | None:
    """A fraction as a percentage, so a table can show the small errors with decimals."""
    return None if fraction is None else 100 * fraction


def find_batch_panel(config: BenchConfig, margin: float, key: str) -> None:
    """Inputs, a "Find batch size" button and, once done, the largest and fastest micro-batch
    with every trial as a chart. ``key`` keeps each page's finder apart."""
    st.caption(f"Doubles the micro-batch until a run does not fit (out of memory, or less than {margin:.0%} of "
               "the memory left free), then binary-searches; every trial is a real run in the worker and is stored.")
    left, middle, right = st.columns(3)
    most = form.server_limit("batch")
    most = None if most is None else max(int(most), 1)
    max_batch = left.number_input("Largest batch to try", min_value=1, step=1, key=f"{key}.max", max_value=most,
                                  value=min(finder.DEFAULT_MAX_BATCH, most or finder.DEFAULT_MAX_BATCH))
    limit = middle.number_input("Time limit (s)", min_value=10, value=int(finder.DEFAULT_TIME_LIMIT_S), step=60,
                                key=f"{key}.limit")

    def find(progress, on_result, cancel) -> dict:
        return finder.find_batch(config, max_batch=int(max_batch), margin=margin, time_limit_s=float(limit),
                                 progress=progress, on_result=on_result, cancel=cancel)

    state = task_button(key, "Find batch size", lambda: Task("Finding the batch size", find, storage.get_store()),
                        where=right)
    if state is None or not state.succeeded:
        return
    report = state.value
    columns = st.columns(3)
    largest = report["max_batch"]
    columns[0].metric("Largest micro-batch that fits", "none" if largest is None else
                      f"{largest}" if report["exact"] else f"≥ {largest}")
    columns[1].metric("Fastest micro-batch tried", report["best_batch"] or "–")
    columns[2].metric("Memory budget", gib(report["budget_bytes"]),
                      help=f"{1 - report['margin']:.0%} of {gib(report['capacity_bytes'])}")
    if report["stopped"]:
        bound = largest is not None and not report["exact"]
        st.warning(f"{'A lower bound, not the answer' if bound else 'Stopped early'}: {ui.plain(report['stopped'])}")
    ui.show_chart(decisions.build_finder_trials(report), key=f"{key}.chart")
    st.dataframe(pd.DataFrame(report["trials"]).drop(columns=["result_id"]), hide_index=True)


def numerical_cost_panel(runs: list[Result], candidates: list[Result], key: str) -> None:
    """What each saving costs: grad_rel_diff against the fp32 / no-checkpointing baseline,
    beside its speed-up and memory saving against its baseline run (chosen among
    ``candidates``, every stored run, so the number is the same on every page), fp16 loss
    scale, skipped steps and energy."""
    rows = gains.gain_rows(runs, candidates)
    if not rows:
        st.info("None of these runs finished, so there is no cost to show.")
        return
    st.caption("The price of each saving: ‖g − g_ref‖/‖g_ref‖ of the first step against the fp32, no-checkpointing "
               "run of the same seed, beside the speed-up and memory saving against the baseline named in each row "
               "(the fastest fp32, no-checkpointing run of the same model, environment and effective batch), fp16 "
               "loss scale, skipped steps and energy (where NVML reports it; empty means unknown).")
    if any(r["grad_rel_diff"] is not None for r in rows):
        ui.show_chart(decisions.build_numerical_cost(rows, runs), key=f"{key}.chart")
    else:
        st.info("None of these runs has a gradient difference (runs recorded before the engine measured it).")
    st.dataframe(pd.DataFrame([{
        "config": r["config"].describe(with_model=False), "samples/s": r["samples_per_s"], "speed-up": r["speedup"],
        "peak": gib(r["peak_allocated_bytes"]), "memory saved %": percent(r["memory_saving"]),
        "grad_rel_diff": r["grad_rel_diff"], "loss scale": r["loss_scale"], "skipped steps": r["skipped_steps"],
        "J/sample": r["energy_j_per_sample"], "baseline": r["baseline"],
    } for r in rows]), hide_index=True, column_config={
        "speed-up": st.column_config.NumberColumn(format="%.2f×"),
        "memory saved %": st.column_config.NumberColumn(format="%+.1f %%"),
        "grad_rel_diff": st.column_config.NumberColumn(format="%.2e"),
        "J/sample": st.column_config.NumberColumn(format="%.3g")})
