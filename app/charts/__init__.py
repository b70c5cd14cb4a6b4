"""Pure plotly figure builders, split by concern: ``common`` (layout, colours, units, failed-run
markers), ``runs`` (per-run charts of the Run, Compare and Results pages and the HTML report)
and ``decisions`` (the Decide page's figures).

No Streamlit in here: pages hand these figures to ``st.plotly_chart``, the HTML report embeds
the very same figures, and tests check them on ``fig.to_dict()``.
"""
