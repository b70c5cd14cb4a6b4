"""Talk page: "Why is my training slow, or out of memory?" in five chapters, each one claim,
one chart and one takeaway from real runs (this machine's when measured live, else the demo
data), with previous/next navigation; the chapter lives in the URL (``chapter=3``) so a
reload or a shared link opens the same slide."""
import streamlit as st

from app import storage, talk, tasks, ui
from engine import devices, pitfall
from engine.config import BenchConfig

COUNT = 1 + len(talk.CHAPTERS)
KEY = "talk.chapter"
LIVE = "talk.live"


def _chapter_from_link() -> int:
    raw = st.query_params.get("chapter", "1")
    return min(max(int(raw), 1), COUNT) if raw.isdigit() else 1


st.session_state.setdefault(KEY, _chapter_from_link())
store = storage.get_store()
runs = store.list()
host = devices.this_host_id()

st.title("Why is my training slow, or out of memory?")
back, where, forward = st.columns([1, 4, 1])
if back.button("← Previous", disabled=st.session_state[KEY] == 1, use_container_width=True):
    st.session_state[KEY] -= 1
if forward.button("Next →", disabled=st.session_state[KEY] == COUNT, use_container_width=True):
    st.session_state[KEY] += 1
number = st.session_state[KEY]
where.progress(number / COUNT, text=f"Chapter {number} of {COUNT}")
st.query_params["chapter"] = str(number)

if number == 1:
    st.subheader(talk.PITFALL_TITLE)
    st.markdown(talk.PITFALL_CLAIM)
    state = tasks.task_button(f"{LIVE}.1", "Run it live on this machine", lambda: tasks.Task(
        "Timing one step both ways", lambda progress, on_result, cancel: pitfall.pitfall(
            BenchConfig(**talk.BASE, batch=8, device="auto"), progress, cancel), None), type="secondary")
    live = state is not None and state.succeeded
    report = state.value if live else talk.demo_pitfall()
    st.caption("Measured live on this machine." if live else
               "Demo data: recorded on a CPU with this tool (app/demo/). Press the button to measure here.")
    ui.show_chart(talk.pitfall_chart(report), key="talk.chart.1", large=True)
    st.success(ui.plain(talk.pitfall_takeaway(report)))
else:
    chapter = talk.CHAPTERS[number - 2]
    st.subheader(chapter.title)
    st.markdown(chapter.claim)
    configs = [c.replace(device="auto") for c in chapter.configs]
    tasks.task_button(f"{LIVE}.{number}", "Run it live on this machine",
                      lambda: tasks.benchmarks(chapter.title, configs, store), type="secondary")
    if not any(r.origin == "demo" for r in runs):
        if st.button("Load demo data", key=f"talk.demo.{number}"):
            storage.load_demo(store)
            st.rerun()
    shown = talk.chapter_runs(list(chapter.configs), runs, host)
    if not shown:
        st.info("No runs of this chapter yet: load the demo data, or run it live on this machine.")
    else:
        origins = sorted({r.origin_words for r in shown})
        st.caption(f"From {len(shown)} run(s): {', '.join(origins)}; {ui.plain(shown[0].env.label)}.")
        ui.show_chart(chapter.chart(shown), key=f"talk.chart.{number}", large=True)
        st.success(ui.plain(chapter.takeaway(shown)))
