"""Device page: the GPUs NVML sees, refreshed live, or which CPU runs will use."""
import pandas as pd
import streamlit as st

from app import tables, tasks, ui
from engine import devices, nvml, selfcheck
from engine.config import GIB

REFRESH_S = 2.0


def _value(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def cpu_panel(facts: dict) -> None:
    """The CPU's cores, threads, memory and load: a busy or oversubscribed CPU times nothing
    reliably, and the load says whether someone else is using it now."""
    cores, threads, ram, load = st.columns(4)
    cores.metric("Cores (usable / logical)", f"{_value(facts['usable_cores'], '{}')} / {_value(facts['logical_cores'], '{}')}")
    threads.metric("Torch threads", _value(facts["torch_threads"], "{}"),
                   help="Threads torch computes with (intra-op); benchmarks run with the same setting.")
    available, total = facts["available_bytes"], facts["ram_bytes"]
    ram.metric("RAM available / total", f"{_value(available and available / GIB, '{:.3g}')} / "
                                         f"{_value(total and total / GIB, '{:.3g}')} GiB")
    load.metric("Load (1 min)", _value(facts["load_avg"], "{:.2f}"),
                help="Processes running or waiting for a core, averaged over a minute.")
    usable, load_now = facts["usable_cores"], facts["load_avg"]
    if usable and load_now is not None and load_now > 0.5 * usable:
        st.warning(f"This CPU is busy (load {load_now:.2f} on {usable} usable cores): timings taken now will be "
                   "slow and noisy. Wait until it is quiet, or compare only runs measured under the same load.")


@st.fragment(run_every=REFRESH_S)
def live_devices() -> None:
    """Re-queried every REFRESH_S seconds without rerunning the rest of the page."""
    gpus = devices.gpus()
    if not gpus:
        st.info(f"{ui.plain(nvml.unavailable_reason() or 'No NVIDIA GPU found')}. "
                f"Benchmarks will run on the CPU: **{ui.plain(devices.cpu_model_name())}**.")
        cpu_panel(devices.cpu_facts())
        return
    for gpu in gpus:
        st.subheader(f"GPU {devices.gpu_label(gpu)}: {ui.plain(gpu['name'])}")
        used, total = gpu["memory_used_bytes"], gpu["memory_total_bytes"]
        memory, utilisation, temperature, power = st.columns(4)
        memory.metric("Memory used", f"{_value(used and used / GIB, '{:.1f}')} / {_value(total and total / GIB, '{:.1f}')} GiB")
        utilisation.metric("Utilisation", _value(gpu["utilization_pct"], "{} %"))
        temperature.metric("Temperature", _value(gpu["temperature_c"], "{} °C"))
        power.metric("Power", _value(gpu["power_w"], "{:.0f} W"))
        if used is not None and total:
            st.progress(min(used / total, 1.0))
        st.caption(ui.plain(f"Driver {gpu['driver'] or 'n/a'} · CUDA {gpu['cuda'] or 'n/a'}"))
    st.caption(f"Runs with device auto use {ui.plain(devices.resolve_device('auto'))}. "
               f"Host CPU: {ui.plain(devices.cpu_model_name())}. "
               f"Refreshed every {REFRESH_S:g} s.")


def self_check() -> None:
    """The tool checks its own measurements on this machine (``python -m engine selfcheck``)."""
    st.subheader("Self-check")
    st.caption("Runs real steps in the engine's worker and compares what the tool measures with what is known: "
               "timing attribution, the timing illusion, peak memory, the memory cap, host synchronisation, "
               "warm vs fresh worker, gradients and the peak-FLOPs table. About half a minute on a CPU.")
    state = tasks.task_button("device.selfcheck", "Run self-check", lambda: tasks.Task(
        "Self-check", lambda progress, on_result, cancel: selfcheck.run_selfcheck("auto", progress, cancel), None))
    if state is None or not state.succeeded:
        return
    st.dataframe(tables.in_words([check.to_dict() for check in state.value]), hide_index=True)
    failed = [check.name for check in state.value if check.status == "fail"]
    if failed:
        st.error("Failed: " + ", ".join(failed))
    else:
        st.success("No check failed.")


st.title("Device")
live_devices()
self_check()
