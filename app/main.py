"""Tradeoff Lab dashboard: ``streamlit run app/main.py``.

The entry point only sets up the page and the navigation; every page is its own file under
app/views/. Not app/pages/: Streamlit treats a folder of that name beside the entry point as
its older multipage app, and a fresh server then runs a page linked by URL (e.g. /compare)
on its own, without this navigation, page config or sidebar.
"""
import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root that holds the
# `engine` and `app` packages.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import params, storage, ui  # noqa: E402

VIEWS = Path(__file__).parent / "views"

# A link with present=1 opens in presentation mode (once per session; the toggle decides after).
st.session_state.setdefault(ui.PRESENTATION_KEY, st.query_params.get(params.PRESENT) == "1")
st.set_page_config(
    page_title="Tradeoff Lab",
    # An emoji, drawn by the browser: a :material/...: favicon is fetched from fonts.gstatic.com,
    # a request to another host on every page load (and none at all offline).
    page_icon="⚡",
    layout="wide",
    initial_sidebar_state="collapsed" if ui.presenting() else "auto",
)

pages = [
    st.Page(VIEWS / "run.py", title="Run", icon=":material/play_arrow:", default=True),
    st.Page(VIEWS / "compare.py", title="Compare", icon=":material/bar_chart:"),
    st.Page(VIEWS / "decide.py", title="Decide", icon=":material/lightbulb:"),
    st.Page(VIEWS / "results.py", title="Results", icon=":material/table:"),
    st.Page(VIEWS / "talk.py", title="Talk", icon=":material/co_present:"),
    st.Page(VIEWS / "device.py", title="Device", icon=":material/memory:"),
]
page = st.navigation(pages)
with st.sidebar:
    st.toggle("Presentation mode", key=ui.PRESENTATION_KEY, help="Larger fonts and charts, sidebar collapsed: for a projector.")
ui.apply_presentation_css()
with storage.database_errors_shown():
    page.run()
