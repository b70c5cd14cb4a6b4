"""Device page: the GPUs NVML sees, refreshed live, or which CPU runs will use."""
import streamlit as st

from app import ui
from engine import devices, nvml
from engine.config import GIB

REFRESH_S = 2.0


def _value(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


@st.fragment(run_every=REFRESH_S)
def live_devices() -> None:
    """Re-queried every REFRESH_S seconds without rerunning the rest of the page."""
    gpus = nvml.list_gpus()
    if not gpus:
        st.info(f"{ui.plain(nvml.unavailable_reason() or 'No NVIDIA GPU found')}. "
                f"Benchmarks will run on the CPU: **{ui.plain(devices.cpu_model_name())}**.")
        return
    for gpu in gpus:
        st.subheader(f"GPU {gpu['index']}: {ui.plain(gpu['name'])}")
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


st.title("Device")
live_devices()
