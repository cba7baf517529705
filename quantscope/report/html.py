"""The report as one self-contained HTML page: tables and plots inlined as PNG data URIs (no script,
no network)."""

from __future__ import annotations

import datetime as _dt
import html
from typing import Any, Sequence

from quantscope.report import plots, tables
from quantscope.results.record import Record


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
table.cmp td { white-space: nowrap; }
table.cmp td:last-child { white-space: normal; }
tr.skipped td { color: #999; }
tr.baseline td { font-weight: 600; }
tr.passed td:nth-child(3) { color: #2a7a2a; }
tr.failed td:nth-child(3) { color: #b22; }
table.kv td { text-align: left; }
img.plot { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
.note { color: #555; font-size: 0.9em; }
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (plots inlined as PNG; no scripts, no network)."""
    records = list(records)
    title = html.escape(tables.title(meta))
    body = [f"<h1>{title}</h1>", f"<p>{html.escape(tables.summary(records))}</p>", "<h2>Comparison</h2>"]
    if not records:
        body.append("<p>No records yet.</p>")
    groups = tables.groups(records)
    for gtitle, rs in groups:
        if len(groups) > 1:
            body.append(f"<h3>{html.escape(gtitle)}</h3>")
        headers, rows = tables.comparison_rows(rs)
        classes = ["skipped" if r.get("error") else "baseline" if r.get("baseline") else "" for r in rs]
        body.append(_html_table(headers, rows, classes).replace("<table>", '<table class="cmp">', 1))
        pareto = plots.pareto_png(rs)
        if pareto:
            body.append(_img(pareto, f"quality vs size and speed: {gtitle}"))
    body.append('<p class="note">KLD: mean KL divergence of each format\'s next-token distribution from the '
                "baseline's; ± in tables is one standard error, bars in plots are 95% intervals. The dashed "
                "line joins the formats no other format beats on both axes.</p>")
    if any(r.get("tasks") for r in records):
        body.append("<h2>Task accuracy</h2>")
        for gtitle, rs in groups:
            if not any(r.get("tasks") for r in rs):
                continue
            if len(groups) > 1:
                body.append(f"<h3>{html.escape(gtitle)}</h3>")
            body.append(_html_table(*tables.task_rows(rs)))
            png = plots.tasks_png(rs)
            if png:
                body.append(_img(png, f"task accuracy: {gtitle}"))
    gen_headers, gen_rows = tables.generation_rows(records)
    if gen_rows:
        body.append("<h2>Generation agreement</h2>")
        body.append('<p class="note">Greedy continuations of each prompt against the baseline\'s; KLD is measured '
                    "along the baseline's continuation (teacher forced). Intervals: Wilson (exact match), paired "
                    "bootstrap over prompts (the others).</p>")
        body.append(_html_table(gen_headers, gen_rows))
    headers, rows, extra = tables.recommendation_rows(meta)
    if rows:
        body.append("<h2>Recommendation</h2>")
        if extra:
            body.append(_html_table(["", ""], [(k, tables.plain(v)) for k, v in extra.items()]).replace("<table>", '<table class="kv">', 1))
        steps, _ = tables.recommendation_steps(meta)
        classes = [{True: "passed", False: "failed"}.get(s.get("passed"), "") for s in steps]
        body.append(_html_table(headers, rows, classes))
    sens = tables.sensitivity(meta)
    if sens:
        body.append("<h2>Layer sensitivity</h2>")
        body.append(f'<p class="note">KLD caused by quantizing one layer alone; the '
                    f"{min(len(sens), tables.SENSITIVITY_TOP)} most sensitive of {len(sens)} layers.</p>")
        png = plots.sensitivity_png(meta)
        if png:
            body.append(_img(png, "layer sensitivity"))
    body.append("<h2>Provenance</h2>")
    body.append(_html_table(["", ""], tables.provenance_rows(records, meta)).replace("<table>", '<table class="kv">', 1))
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body.append(f'<p class="note">Report generated {generated}.</p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
