"""Ways to hand results to a teammate: JSON bundle, CSV and a standalone HTML report.

All pure (results in, bytes or text out). The report inlines plotly.js, so it opens offline
from a mail attachment or a USB stick with no server, and embeds the JSON bundle so the
numbers behind every chart travel with it.
"""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone

from engine.results import Result, dumps_jsonl

from .charts import runs as run_charts
from .tables import runs_frame

REPORT_TEMPLATE = "plotly_white"
_REPORT_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
/* Grid columns are fixed before the charts load, so plotly sizes each chart to its cell when
   its script runs (a flex row would still be one chart wide at that moment). */
.row { display: grid; gap: 1rem; grid-template-columns: repeat(var(--columns), minmax(0, 1fr)); }
@media (max-width: 1000px) { .row { grid-template-columns: minmax(0, 1fr); } }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
pre { background: #f6f6f6; padding: 1rem; overflow-x: auto; font-size: 0.75rem; }
"""
# A spreadsheet runs a cell starting with one of these as a formula (=HYPERLINK(...), +cmd|...).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def bundle_bytes(results: list[Result]) -> bytes:
    """The runs as a JSON Lines bundle (what the Results page imports)."""
    return dumps_jsonl(results).encode("utf-8")


def spreadsheet_text(value):
    """A text cell a spreadsheet would run as a formula, prefixed with ``'`` so it shows as
    text (OWASP's advice for CSV); anything else, numbers included, as it is."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def csv_bytes(results: list[Result]) -> bytes:
    """The runs table (status, config, key metrics) as CSV; text cells that a spreadsheet
    would take for a formula (a model, device or error from a file) are made plain text."""
    frame = runs_frame(results)
    text = frame.select_dtypes(include=["object", "string"]).columns
    frame[text] = frame[text].map(spreadsheet_text)
    # CRLF rows (RFC 4180): the writer then quotes a cell holding a lone carriage return too,
    # which a spreadsheet would otherwise take for the end of the row.
    return frame.to_csv(index=False, lineterminator="\r\n").encode("utf-8")


def report_figures(results: list[Result]) -> list:
    """The figures of a report: the three main charts, both breakdowns and, for a sweep,
    throughput against the first swept field."""
    figures = [build(results) for build in run_charts.MAIN_CHARTS]
    figures += [run_charts.build_phase_breakdown(results), run_charts.build_memory_breakdown(results)]
    swept = run_charts.sweep_fields(results)
    if swept:
        figures.append(run_charts.build_sweep_lines(results, swept[0], "throughput"))
    return figures


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(key))}</th>" for key in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(results: list[Result], title: str = "Tradeoff Lab report") -> str:
    """A standalone HTML page: interactive charts, the runs table, configs, environments and
    the raw results."""
    figures = report_figures(results)
    # plotly.js goes in once, inline, with the first chart; the others reuse it. The template is
    # explicit: inside the app, Streamlit's default template holds placeholder colours that only
    # its own frontend fills in.
    chart_divs = [
        fig.update_layout(template=REPORT_TEMPLATE).to_html(
            full_html=False, include_plotlyjs=(i == 0), default_width="100%",
            config={"displaylogo": False, "responsive": True})
        for i, fig in enumerate(figures)
    ]
    labels = run_charts.run_labels(results)
    configs = [{"run": label, "id": r.id, "status": r.status,
                "config": json.dumps(r.config.to_dict(), sort_keys=True)} for label, r in zip(labels, results)]
    env_rows = [env.to_dict() for env in dict.fromkeys(r.env for r in results)]  # each environment once
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_REPORT_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{len(results)} runs, generated {generated} by Tradeoff Lab. Environments: {html.escape(", ".join(
        sorted({r.env.label for r in results})))}.</p>
<div class="row" style="--columns: 3">{"".join(f"<div>{div}</div>" for div in chart_divs[:3])}</div>
<div class="row" style="--columns: 2">{"".join(f"<div>{div}</div>" for div in chart_divs[3:5])}</div>
<div class="row" style="--columns: 1">{"".join(f"<div>{div}</div>" for div in chart_divs[5:])}</div>
<h2>Runs</h2>
{runs_frame(results).to_html(index=False, na_rep="", border=0)}
<h2>Configurations</h2>
{_table(configs)}
<h2>Environments</h2>
{_table(env_rows)}
<h2>Raw results (JSON Lines; save as .jsonl to import into Tradeoff Lab)</h2>
<details><summary>show</summary><pre>{html.escape(dumps_jsonl(results))}</pre></details>
</body></html>
"""
