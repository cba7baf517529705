"""The report as Markdown: tables only (the plots are in the HTML page)."""

from __future__ import annotations

from typing import Any, Sequence

from quantscope.report import tables
from quantscope.results.record import Record


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """The report as Markdown: comparison, tasks, recommendation trail, sensitivity, provenance."""
    records = list(records)
    out = [f"# {tables.title(meta)}", "", tables.summary(records), "", "## Comparison", ""]
    if not records:
        out += ["No records yet.", ""]
    groups = tables.groups(records)
    for title, rs in groups:
        if len(groups) > 1:
            out += [f"### {title}", ""]
        out += [markdown_table(*tables.comparison_rows(rs)), ""]
    out.append("KLD is the mean KL divergence of each format's next-token distribution from the "
               "baseline's; ± is one standard error.")
    out.append("")
    if any(r.get("tasks") for r in records):
        out += ["## Task accuracy", "", "Accuracy [95% interval]; Δ is the paired difference from the baseline.", ""]
        for title, rs in groups:
            if any(r.get("tasks") for r in rs):
                if len(groups) > 1:
                    out += [f"### {title}", ""]
                out += [markdown_table(*tables.task_rows(rs)), ""]
    gen_headers, gen_rows = tables.generation_rows(records)
    if gen_rows:
        out += ["## Generation agreement", "", "Greedy continuations of each prompt against the baseline's; KLD "
                "is measured along the baseline's continuation (teacher forced). Intervals: Wilson (exact match), "
                "paired bootstrap over prompts (the others).", "", markdown_table(gen_headers, gen_rows), ""]
    headers, rows, extra = tables.recommendation_rows(meta)
    if rows:
        out += ["## Recommendation", ""]
        out += [f"- {k}: {tables.plain(v)}" for k, v in extra.items()]
        out += ([""] if extra else []) + [markdown_table(headers, rows), ""]
    sens = tables.sensitivity(meta)
    if sens:
        shown = sens[:tables.SENSITIVITY_TOP]
        out += ["## Layer sensitivity", "",
                f"KLD caused by quantizing one layer alone; the {len(shown)} most sensitive of {len(sens)}.", ""]
        out += [markdown_table(["rank", "layer", "KLD"], [[str(i), n, f"{k:.4g}"] for i, (n, k) in enumerate(shown, 1)]), ""]
    out += ["## Provenance", "", markdown_table(["", ""], tables.provenance_rows(records, meta)), ""]
    return "\n".join(out)
