"""Reports of a run: Markdown (tables only) and one self-contained HTML page (tables + embedded plots).

Pure functions of (records, meta): the records are the flat dicts of `quantscope.results`, the meta
is the run's metadata (`recommendation`, `sensitivity`, `machine`, `created`, `study` when present).
Missing or None fields render as "—"; records with an `error` (skipped formats) appear in the table
with the reason and are left out of the plots.

- `fmt`: number formatting (`fmt_num`, `fmt_bytes`, `fmt_pct`, `fmt_pm`);
- `tables`: the tables as strings, shared by both renderers;
- `markdown`, `html`: the two renderers; `plots`: the HTML page's PNGs (matplotlib, optional).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from quantscope.evaluate.stats import Z95
from quantscope.fileio import write_text_atomic
from quantscope.report.fmt import MISSING, fmt_bytes, fmt_num, fmt_pct, fmt_pm
from quantscope.report.html import render_html
from quantscope.report.markdown import markdown_table, render_markdown
from quantscope.report.plots import pareto_front
from quantscope.report.tables import (COMPARISON_HEADERS, SENSITIVITY_TOP, comparison_rows, provenance_rows,
                                      recommendation_rows, task_rows)
from quantscope.results.record import Record

__all__ = [
    "COMPARISON_HEADERS", "MISSING", "SENSITIVITY_TOP", "Z95", "comparison_rows", "fmt_bytes", "fmt_num",
    "fmt_pct", "fmt_pm", "markdown_table", "pareto_front", "provenance_rows", "recommendation_rows",
    "render_html", "render_markdown", "task_rows", "write_report",
]


def write_report(
    records: Sequence[Record],
    meta: dict[str, Any],
    html_path: str | os.PathLike | None = None,
    md_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Render first, then write each requested file atomically; nothing is written if rendering fails."""
    rendered = []
    if html_path is not None:
        rendered.append((Path(html_path), render_html(records, meta)))
    if md_path is not None:
        rendered.append((Path(md_path), render_markdown(records, meta)))
    for path, text in rendered:
        write_text_atomic(path, text)
    return [path for path, _ in rendered]
