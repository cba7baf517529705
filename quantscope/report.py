"""Reports of a run: Markdown (tables only) and one self-contained HTML page (tables + embedded plots).

Pure functions of (records, meta): the records are the flat dicts of `quantscope.results`, the meta
is the run's metadata (`recommendation`, `sensitivity`, `machine`, `created`, `study` when present).
Missing or None fields render as "—"; records with an `error` (skipped formats) appear in the table
with the reason and are left out of the plots.

The HTML page needs no network and no script: plots are PNGs drawn with matplotlib (optional
dependency, imported only when HTML is rendered) and inlined as base64 data URIs. Figures are made
with `matplotlib.figure.Figure` directly, not pyplot, so rendering touches no global state.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from quantscope.errors import QuantscopeError
from quantscope.fileio import write_text_atomic
from quantscope.results.record import Record

MISSING = "—"
SENSITIVITY_TOP = 30  # layers drawn in the sensitivity chart (the most sensitive ones)
Z95 = 1.959963984540054  # two-sided 95% normal quantile: error bars are mean ± Z95 * stderr

COMPARISON_HEADERS = (
    "format", "bits/weight", "weight bytes", "perplexity", "KLD mean", "top-1 agree",
    "prefill tok/s", "decode tok/s", "quantize s", "peak RSS", "note",
)


# --- number formatting ----------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt_num(value: Any, decimals: int = 2) -> str:
    v = _num(value)
    if v is None:
        return MISSING
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.{decimals}f}"


def fmt_bytes(value: Any) -> str:
    v = _num(value)
    if v is None or not math.isfinite(v):
        return MISSING
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


def fmt_pct(value: Any, decimals: int = 1) -> str:
    v = _num(value)
    return MISSING if v is None else f"{100 * v:.{decimals}f} %"


def fmt_pm(value: Any, stderr: Any) -> str:
    """`value ± stderr`, both rounded to the stderr's second significant digit."""
    v, se = _num(value), _num(stderr)
    if v is None:
        return MISSING
    if not math.isfinite(v):
        return str(v)
    if se is None or not math.isfinite(se) or se <= 0:
        digits = 4 if abs(v) < 1 else 3
        return f"{v:.{digits}g}" if v != 0 else "0"
    exponent = math.floor(math.log10(se)) - 1  # decimal place of se's 2nd significant digit
    if v != 0 and abs(v) < 1e-3:  # tiny KLDs: (1.23 ± 0.05)e-5 reads better than 0.0000123
        scale = math.floor(math.log10(abs(v)))
        decimals = max(0, scale - exponent)
        return f"({v / 10**scale:.{decimals}f} ± {se / 10**scale:.{decimals}f})e{scale}"
    decimals = max(0, -exponent)
    return f"{v:.{decimals}f} ± {se:.{decimals}f}"


# --- tables ---------------------------------------------------------------------------------------


def _format_label(record: Record) -> str:
    label = str(record.get("format", "?"))
    return f"{label} (baseline)" if record.get("baseline") else label


def comparison_rows(records: Iterable[Record]) -> tuple[tuple[str, ...], list[list[str]]]:
    """The comparison table as strings (headers, rows), for Markdown, HTML or a terminal."""
    rows = []
    for r in records:
        note = f"skipped: {r['error']}" if r.get("error") else "; ".join(map(str, r.get("notes") or []))
        rows.append([
            _format_label(r),
            fmt_num(r.get("bits_per_weight"), 2),
            fmt_bytes(r.get("weight_bytes")),
            fmt_pm(r.get("perplexity"), r.get("perplexity_stderr")),
            fmt_pm(r.get("kld_mean"), r.get("kld_stderr")),
            fmt_pct(r.get("top1_agreement")),
            fmt_num(r.get("prefill_tokens_per_s"), 1),
            fmt_num(r.get("decode_tokens_per_s"), 1),
            fmt_num(r.get("quantize_seconds"), 2),
            fmt_bytes(r.get("peak_rss_bytes")),
            note,
        ])
    return COMPARISON_HEADERS, rows


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _groups(records: Sequence[Record]) -> list[tuple[str, list[Record]]]:
    """Records split by what makes their numbers comparable: model, text, ctx, windows."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.get("model"), r.get("text"), r.get("ctx"), r.get("windows")), []).append(r)
    return [
        (f"model {m} · text {t} · ctx {c} · {w} windows", rs) for (m, t, c, w), rs in groups.items()
    ]


def _task_names(records: Sequence[Record]) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        for name in (r.get("tasks") or {}):
            names[name] = None
    return list(names)


def _interval(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, dict):
        ci = (ci.get("lo", ci.get("low")), ci.get("hi", ci.get("high")))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(x) is not None for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def task_rows(records: Sequence[Record]) -> tuple[list[str], list[list[str]]]:
    """Accuracy with its 95% interval per (format, task), and the paired delta when measured."""
    names = _task_names(records)
    headers = ["format"] + names
    rows = []
    for r in records:
        if not r.get("tasks"):
            continue
        row = [_format_label(r)]
        for name in names:
            t = (r.get("tasks") or {}).get(name) or {}
            cell = fmt_pct(t.get("acc"))
            ci = _interval(t.get("acc_ci"))
            if ci and cell != MISSING:
                cell += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
            delta, dci = _num(t.get("delta")), _interval(t.get("delta_ci"))
            if delta is not None:
                cell += f"; Δ {100 * delta + 0.0:+.1f}"
                if dci:
                    cell += f" [{100 * dci[0]:+.1f}, {100 * dci[1]:+.1f}]"
            if t.get("n") is not None:
                cell += f" (n={t['n']})"
            row.append(cell)
        rows.append(row)
    return headers, rows


def _recommendation_steps(meta: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    rec = meta.get("recommendation")
    if isinstance(rec, dict):
        steps = rec.get("steps") or []
        extra = {k: v for k, v in rec.items() if k != "steps"}
    else:
        steps, extra = (rec or []), {}
    return [s for s in steps if isinstance(s, dict)], extra


def recommendation_rows(meta: dict[str, Any]) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    steps, extra = _recommendation_steps(meta)
    more: dict[str, None] = {}
    for s in steps:
        for k in s:
            if k not in ("format", "passed", "reason"):
                more[k] = None
    headers = ["step", "format", "verdict", "reason"] + list(more)
    rows = []
    for i, s in enumerate(steps, 1):
        verdict = {True: "passed", False: "failed"}.get(s.get("passed"), MISSING)
        rows.append([str(i), str(s.get("format", MISSING)), verdict, str(s.get("reason", ""))]
                    + [_plain(s.get(k)) for k in more])
    return headers, rows, extra


def _plain(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _sensitivity(meta: dict[str, Any]) -> list[tuple[str, float]]:
    entries = []
    for s in meta.get("sensitivity") or []:
        if isinstance(s, dict) and _num(s.get("kld")) is not None:
            entries.append((str(s.get("layer", "?")), float(s["kld"])))
    return sorted(entries, key=lambda e: -e[1])


def provenance_rows(records: Sequence[Record], meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the numbers come from: model, text hash, versions, machine, date."""
    def distinct(field: str) -> str:
        values = list(dict.fromkeys(str(r[field]) for r in records if r.get(field) is not None))
        return ", ".join(values) if values else MISSING

    rows = [("run", str(meta.get("name", MISSING))), ("created", str(meta.get("created", MISSING)))]
    models = dict.fromkeys((r.get("model"), r.get("model_fingerprint")) for r in records if r.get("model"))
    rows += [("model", f"{m}" + (f" (fingerprint {fp[:16]})" if fp else "")) for m, fp in models] or [
        ("model", str(meta.get("model", MISSING)))]
    texts = dict.fromkeys((r.get("text"), r.get("text_sha256")) for r in records if r.get("text"))
    rows += [("text", f"{t}" + (f" (sha256 {h})" if h else "")) for t, h in texts]
    rows += [("ctx", distinct("ctx")), ("windows", distinct("windows")), ("tokens scored", distinct("tokens_scored"))]
    for field, label in (("quantscope_version", "quantscope"), ("torch_version", "torch"),
                         ("transformers_version", "transformers")):
        rows.append((label, distinct(field)))
    for r in records:
        if r.get("backend"):
            version = f" {r['backend_version']}" if r.get("backend_version") else ""
            rows.append((f"backend of {r.get('format')}", f"{r['backend']}{version}"))
    machine = meta.get("machine")
    if isinstance(machine, dict):
        rows += [(f"machine {k}", str(v)) for k, v in machine.items() if v is not None]
    elif machine:
        rows.append(("machine", str(machine)))
    return rows


# --- Markdown -------------------------------------------------------------------------------------


def _title(meta: dict[str, Any]) -> str:
    return f"quantscope report: {meta.get('name', 'run')}"


def _summary(records: Sequence[Record]) -> str:
    skipped = [str(r.get("format")) for r in records if r.get("error")]
    text = f"{len(records)} record(s), {len(records) - len(skipped)} measured"
    return text + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else "") + "."


def render_markdown(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """The report as Markdown: comparison, tasks, recommendation trail, sensitivity, provenance."""
    records = list(records)
    out = [f"# {_title(meta)}", "", _summary(records), "", "## Comparison", ""]
    if not records:
        out += ["No records yet.", ""]
    groups = _groups(records)
    for title, rs in groups:
        if len(groups) > 1:
            out += [f"### {title}", ""]
        out += [markdown_table(*comparison_rows(rs)), ""]
    out.append("KLD is the mean KL divergence of each format's next-token distribution from the "
               "baseline's; ± is one standard error.")
    out.append("")
    if any(r.get("tasks") for r in records):
        out += ["## Task accuracy", "", "Accuracy [95% interval]; Δ is the paired difference from the baseline.", ""]
        for title, rs in groups:
            if any(r.get("tasks") for r in rs):
                if len(groups) > 1:
                    out += [f"### {title}", ""]
                out += [markdown_table(*task_rows(rs)), ""]
    headers, rows, extra = recommendation_rows(meta)
    if rows:
        out += ["## Recommendation", ""]
        out += [f"- {k}: {_plain(v)}" for k, v in extra.items()]
        out += ([""] if extra else []) + [markdown_table(headers, rows), ""]
    sens = _sensitivity(meta)
    if sens:
        shown = sens[:SENSITIVITY_TOP]
        out += ["## Layer sensitivity", "",
                f"KLD caused by quantizing one layer alone; the {len(shown)} most sensitive of {len(sens)}.", ""]
        out += [markdown_table(["rank", "layer", "KLD"], [[str(i), n, f"{k:.4g}"] for i, (n, k) in enumerate(shown, 1)]), ""]
    out += ["## Provenance", "", markdown_table(["", ""], provenance_rows(records, meta)), ""]
    return "\n".join(out)


# --- plots ----------------------------------------------------------------------------------------


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise QuantscopeError(
            "the HTML report draws its plots with matplotlib, which is not installed: "
            "pip install 'quantscope[report]'"
        ) from e
    return matplotlib, Figure


def pareto_front(xs: Sequence[float], ys: Sequence[float], maximize_x: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes (lower y; lower x, or higher if
    `maximize_x`), ordered along x."""
    order = sorted(range(len(xs)), key=lambda i: ((-xs[i] if maximize_x else xs[i]), ys[i]))
    front, best = [], math.inf
    for i in order:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return front


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _quality(records: Sequence[Record]) -> tuple[str, str, str] | None:
    """(field, stderr field, axis label): KLD when measured, else perplexity."""
    if any(_num(r.get("kld_mean")) is not None for r in records):
        return "kld_mean", "kld_stderr", "KLD from baseline (mean, 95% CI)"
    if any(_num(r.get("perplexity")) is not None for r in records):
        return "perplexity", "perplexity_stderr", "perplexity (95% CI)"
    return None


def _pareto_png(records: Sequence[Record]) -> str | None:
    quality = _quality(records)
    if quality is None:
        return None
    qfield, sefield, qlabel = quality
    panels = [(x, label, maximize) for x, label, maximize in (
        ("bits_per_weight", "bits per weight (quantized layers)", False),
        ("decode_tokens_per_s", "decode tokens/s", True),
    ) if any(_num(r.get(x)) is not None and _num(r.get(qfield)) is not None for r in records)]
    if not panels:
        return None
    _, Figure = _matplotlib()
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xfield, xlabel, maximize) in zip(axes, panels):
        pts = [r for r in records if not r.get("error")
               and _num(r.get(xfield)) is not None and _num(r.get(qfield)) is not None
               and math.isfinite(_num(r.get(xfield))) and math.isfinite(_num(r.get(qfield)))]
        xs = [float(r[xfield]) for r in pts]
        ys = [float(r[qfield]) for r in pts]
        err = [Z95 * (_num(r.get(sefield)) or 0.0) for r in pts]
        for r, x, y, e in zip(pts, xs, ys, err):
            ax.errorbar([x], [y], yerr=[[min(e, y) if qfield == "kld_mean" else e], [e]],
                        fmt="*" if r.get("baseline") else "o", ms=10 if r.get("baseline") else 6,
                        capsize=3, color="#d62728" if r.get("baseline") else "#1f77b4")
            ax.annotate(str(r.get("format")), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = pareto_front(xs, ys, maximize_x=maximize)
        if len(front) > 1:
            ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="#888888", lw=1,
                    label="Pareto front", zorder=0)
            ax.legend(loc="best", fontsize=8)
        positive = [y - e for y, e in zip(ys, err) if y - e > 0] or [y for y in ys if y > 0]
        if qfield == "kld_mean" and positive:
            # symlog: the baseline's KLD of exactly 0 stays on the plot, small KLDs stay readable.
            ax.set_yscale("symlog", linthresh=min(positive))
        ax.margins(x=0.12)  # room for the labels of the outermost points
        ax.set_xlabel(xlabel)
        ax.set_ylabel(qlabel)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"quality vs {xlabel.split(' (')[0]}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _tasks_png(records: Sequence[Record]) -> str | None:
    names = _task_names(records)
    rows = [r for r in records if r.get("tasks") and not r.get("error")]
    if not names or not rows:
        return None
    _, Figure = _matplotlib()
    fig = Figure(figsize=(max(6.0, 1.2 * len(names) * max(1, len(rows)) / 2 + 2), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        xs, accs, lo, hi = [], [], [], []
        for i, name in enumerate(names):
            t = (r.get("tasks") or {}).get(name) or {}
            acc = _num(t.get("acc"))
            if acc is None:
                continue
            ci = _interval(t.get("acc_ci")) or (acc, acc)
            xs.append(i - 0.4 + width * (j + 0.5))
            accs.append(100 * acc)
            lo.append(100 * max(0.0, acc - ci[0]))
            hi.append(100 * max(0.0, ci[1] - acc))
        ax.bar(xs, accs, width=width * 0.95, yerr=[lo, hi], capsize=2, label=_format_label(r))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20 if len(names) > 4 else 0)
    ax.set_ylabel("accuracy, % (95% interval)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(rows)))
    ax.set_title("task accuracy", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _sensitivity_png(meta: dict[str, Any]) -> str | None:
    sens = _sensitivity(meta)[:SENSITIVITY_TOP]
    if not sens:
        return None
    _, Figure = _matplotlib()
    fig = Figure(figsize=(8, 0.28 * len(sens) + 1.2))
    ax = fig.subplots()
    names = [n for n, _ in sens][::-1]
    ax.barh(range(len(sens)), [k for _, k in sens][::-1], color="#ff7f0e")
    ax.set_yticks(range(len(sens)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("KLD when only this layer is quantized")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("layer sensitivity (most sensitive first)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# --- HTML -----------------------------------------------------------------------------------------

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


def _img(b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (plots inlined as PNG; no scripts, no network)."""
    records = list(records)
    title = html.escape(_title(meta))
    body = [f"<h1>{title}</h1>", f"<p>{html.escape(_summary(records))}</p>", "<h2>Comparison</h2>"]
    if not records:
        body.append("<p>No records yet.</p>")
    groups = _groups(records)
    for gtitle, rs in groups:
        if len(groups) > 1:
            body.append(f"<h3>{html.escape(gtitle)}</h3>")
        headers, rows = comparison_rows(rs)
        classes = ["skipped" if r.get("error") else "baseline" if r.get("baseline") else "" for r in rs]
        body.append(_html_table(headers, rows, classes).replace("<table>", '<table class="cmp">', 1))
        pareto = _pareto_png(rs)
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
            body.append(_html_table(*task_rows(rs)))
            png = _tasks_png(rs)
            if png:
                body.append(_img(png, f"task accuracy: {gtitle}"))
    headers, rows, extra = recommendation_rows(meta)
    if rows:
        body.append("<h2>Recommendation</h2>")
        if extra:
            body.append(_html_table(["", ""], [(k, _plain(v)) for k, v in extra.items()]).replace("<table>", '<table class="kv">', 1))
        steps, _ = _recommendation_steps(meta)
        classes = [{True: "passed", False: "failed"}.get(s.get("passed"), "") for s in steps]
        body.append(_html_table(headers, rows, classes))
    sens = _sensitivity(meta)
    if sens:
        body.append("<h2>Layer sensitivity</h2>")
        body.append(f'<p class="note">KLD caused by quantizing one layer alone; the '
                    f"{min(len(sens), SENSITIVITY_TOP)} most sensitive of {len(sens)} layers.</p>")
        png = _sensitivity_png(meta)
        if png:
            body.append(_img(png, "layer sensitivity"))
    body.append("<h2>Provenance</h2>")
    body.append(_html_table(["", ""], provenance_rows(records, meta)).replace("<table>", '<table class="kv">', 1))
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body.append(f'<p class="note">Report generated {generated}.</p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --- files ----------------------------------------------------------------------------------------


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
