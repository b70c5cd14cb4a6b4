"""Device page: the GPUs NVML sees, refreshed live, or which CPU runs will use."""
import pandas as pd
import streamlit as st

from app import tasks, ui
from engine import devices, nvml, selfcheck
from engine.config import GIB

REFRESH_S = 2.0


def _value(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


@st.fragment(run_every=REFRESH_S)
def live_devices() -> None:
    """Re-queried every REFRESH_S seconds without rerunning the rest of the page."""
    gpus = devices.gpus()
    if not gpus:
        st.info(f"{ui.plain(nvml.unavailable_reason() or 'No NVIDIA GPU found')}. "
                f"Benchmarks will run on the CPU: **{ui.plain(devices.cpu_model_name())}**.")
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
    st.dataframe(pd.DataFrame([check.to_dict() for check in state.value]), hide_index=True)
    failed = [check.name for check in state.value if check.status == "fail"]
    if failed:
        st.error("Failed: " + ", ".join(failed))
    else:
        st.success("No check failed.")


st.title("Device")
live_devices()
self_check()
