"""Tradeoff Lab dashboard: ``streamlit run app/main.py``.

The entry point only sets up the page and the navigation; every page is its own file under
app/pages/. The decision page (app/pages/decide.py) joins the navigation when it exists.
"""
import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root that holds the
# `engine` and `app` packages.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import ui  # noqa: E402

PAGES = Path(__file__).parent / "pages"

st.set_page_config(
    page_title="Tradeoff Lab",
    page_icon=":material/speed:",
    layout="wide",
    initial_sidebar_state="collapsed" if ui.presenting() else "auto",
)

pages = [
    st.Page(PAGES / "run.py", title="Run", icon=":material/play_arrow:", default=True),
    st.Page(PAGES / "compare.py", title="Compare", icon=":material/bar_chart:"),
    st.Page(PAGES / "results.py", title="Results", icon=":material/table:"),
    st.Page(PAGES / "device.py", title="Device", icon=":material/memory:"),
]
if (PAGES / "decide.py").exists():
    pages.insert(2, st.Page(PAGES / "decide.py", title="Decide", icon=":material/lightbulb:"))

page = st.navigation(pages)
with st.sidebar:
    st.toggle("Presentation mode", key=ui.PRESENTATION_KEY, help="Larger fonts and charts, sidebar collapsed: for a projector.")
ui.apply_presentation_css()
page.run()
