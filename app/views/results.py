"""Results page: every stored run in a sortable, filterable table; delete, export, import."""
import hashlib

import streamlit as st

from app import exports, storage, ui
from app.tables import runs_frame
from engine.results import STATUSES
from engine.store import import_bundle

st.title("Results")
store = storage.get_store()

# ---------------------------------------------------------------- add runs
upload_column, demo_column = st.columns([3, 1])
with upload_column:
    uploads = st.file_uploader("Import result bundles (.jsonl / .json)", type=["jsonl", "json"],
                               accept_multiple_files=True, key="results.upload")
with demo_column:
    st.write("")
    load_demo = st.button("Load demo data", help="Real runs of gpt-tiny (batch × precision × checkpointing) recorded on a CPU; see app/demo/README.md.")

# An uploaded file stays in the widget across reruns; import each one once.
imported = st.session_state.setdefault("results.imported_files", set())
outcomes = [import_bundle(store, f.name, f.getvalue()) for f in uploads or [] if f.file_id not in imported]
imported.update(f.file_id for f in uploads or [])
if load_demo:
    outcomes += storage.load_demo(store)
for outcome in outcomes:
    (st.error if outcome.error else st.success)(ui.plain(outcome.message()))

# ---------------------------------------------------------------- the table
results = store.list()
# The store leaves out rows it cannot read (written by another version, or damaged); say so,
# so they can be deleted instead of silently missing. COUNT first: reading them is a second pass.
if store.count() > len(results):
    unreadable = store.unreadable()
    with st.expander(f"{len(unreadable)} stored run(s) cannot be read and are not shown"):
        for run_id, problem in unreadable:
            st.code(problem, language=None, wrap_lines=True)
        if st.button("Delete the unreadable runs", key="results.delete_unreadable"):
            store.delete(run_id for run_id, _ in unreadable)
            st.rerun()
if not results:
    st.info("No runs stored yet: run a benchmark on the Run page, import a bundle above, or load the demo data.")
    st.stop()

status_column, model_column, device_column = st.columns(3)
statuses = status_column.multiselect("Status", STATUSES, key="results.status")
model_names = model_column.multiselect("Model", sorted({r.config.model for r in results}), key="results.model")
device_names = device_column.multiselect("Device", sorted({r.env.label for r in results}), key="results.device")
shown = [r for r in results
         if (not statuses or r.status in statuses)
         and (not model_names or r.config.model in model_names)
         and (not device_names or r.env.label in device_names)]

st.caption(f"{len(shown)} of {len(results)} runs in {ui.plain(store.path)}. Click a column header to sort; "
           "select rows to export, compare or delete them.")
table = st.dataframe(
    runs_frame(shown),
    hide_index=True,
    on_select="rerun",
    selection_mode="multi-row",
    # Keyed by the rows shown: a filter, delete or import starts a fresh selection instead of
    # keeping row numbers that now point at other runs.
    key="results.table." + hashlib.sha1("".join(r.id for r in shown).encode()).hexdigest()[:12],
    column_config={
        "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
        "samples/s": st.column_config.NumberColumn(format="%.1f"),
        "tokens/s": st.column_config.NumberColumn(format="%.0f"),
        "step ms": st.column_config.NumberColumn(format="%.2f"),
        "forward ms": st.column_config.NumberColumn(format="%.2f"),
        "backward ms": st.column_config.NumberColumn(format="%.2f"),
        "optimizer ms": st.column_config.NumberColumn(format="%.2f"),
        "step noise %": st.column_config.NumberColumn(format="%.1f"),
        "peak GiB": st.column_config.NumberColumn(format="%.3f"),
        "MFU %": st.column_config.NumberColumn(format="%.1f"),
    },
)
selected = [shown[i] for i in table.selection.rows]
chosen = selected or shown
scope = f"the {len(selected)} selected run(s)" if selected else f"all {len(shown)} shown run(s)"

# ---------------------------------------------------------------- act on the selection
st.subheader("Export, compare, delete")
st.caption(f"Applies to {scope}.")
bundle, csv, report, compare, delete = st.columns(5)
# Callables: the files are built only when a button is clicked, so a page with 1,000 runs
# does not build an HTML report (with plotly.js inlined) on every rerun.
bundle.download_button("JSON bundle", lambda: exports.bundle_bytes(chosen), file_name="tradeoff-lab-runs.jsonl",
                       mime="application/jsonl", on_click="ignore", icon=":material/download:")
csv.download_button("CSV", lambda: exports.csv_bytes(chosen), file_name="tradeoff-lab-runs.csv", mime="text/csv",
                    on_click="ignore", icon=":material/download:")
report.download_button("HTML report", lambda: exports.report_html(chosen), file_name="tradeoff-lab-report.html",
                       mime="text/html", on_click="ignore", icon=":material/download:")
if compare.button("Compare", disabled=not selected, help="Open the selected runs on the Compare page."):
    st.session_state["compare.ids"] = [r.id for r in selected]
    st.switch_page("views/compare.py")
with delete.popover("Delete", disabled=not selected, icon=":material/delete:"):
    st.write(f"Delete {len(selected)} run(s) from the store? This cannot be undone.")
    if st.button("Delete for good", type="primary"):
        st.session_state["results.deleted"] = store.delete(r.id for r in selected)
        st.rerun()
if "results.deleted" in st.session_state:
    st.success(f"Deleted {st.session_state.pop('results.deleted')} run(s).")
