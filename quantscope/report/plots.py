"""The HTML report's plots as base64 PNGs: quality vs size and speed (with the Pareto front), task
accuracy, layer sensitivity.

matplotlib is an optional dependency, imported only when a plot is drawn. Figures are made with
`matplotlib.figure.Figure` directly, not pyplot, so drawing touches no global state. Records with an
`error` (skipped formats) are left out.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Sequence

from quantscope.errors import QuantscopeError
from quantscope.evaluate.stats import Z95  # error bars are mean ± Z95 x stderr
from quantscope.report import tables
from quantscope.report.fmt import num
from quantscope.results.record import Record


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
    if any(num(r.get("kld_mean")) is not None for r in records):
        return "kld_mean", "kld_stderr", "KLD from baseline (mean, 95% CI)"
    if any(num(r.get("perplexity")) is not None for r in records):
        return "perplexity", "perplexity_stderr", "perplexity (95% CI)"
    return None


def pareto_png(records: Sequence[Record]) -> str | None:
    quality = _quality(records)
    if quality is None:
        return None
    qfield, sefield, qlabel = quality
    panels = [(x, label, maximize) for x, label, maximize in (
        ("bits_per_weight", "bits per weight (quantized layers)", False),
        ("decode_tokens_per_s", "decode tokens/s", True),
    ) if any(num(r.get(x)) is not None and num(r.get(qfield)) is not None for r in records)]
    if not panels:
        return None
    _, Figure = _matplotlib()
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xfield, xlabel, maximize) in zip(axes, panels):
        pts = [r for r in records if not r.get("error")
               and num(r.get(xfield)) is not None and num(r.get(qfield)) is not None
               and math.isfinite(num(r.get(xfield))) and math.isfinite(num(r.get(qfield)))]
        xs = [float(r[xfield]) for r in pts]
        ys = [float(r[qfield]) for r in pts]
        err = [Z95 * (num(r.get(sefield)) or 0.0) for r in pts]
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


def tasks_png(records: Sequence[Record]) -> str | None:
    names = tables.task_names(records)
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
            acc = num(t.get("acc"))
            if acc is None:
                continue
            ci = tables.interval(t.get("acc_ci")) or (acc, acc)
            xs.append(i - 0.4 + width * (j + 0.5))
            accs.append(100 * acc)
            lo.append(100 * max(0.0, acc - ci[0]))
            hi.append(100 * max(0.0, ci[1] - acc))
        ax.bar(xs, accs, width=width * 0.95, yerr=[lo, hi], capsize=2, label=tables.format_label(r))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20 if len(names) > 4 else 0)
    ax.set_ylabel("accuracy, % (95% interval)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(rows)))
    ax.set_title("task accuracy", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def sensitivity_png(meta: dict[str, Any]) -> str | None:
    sens = tables.sensitivity(meta)[:tables.SENSITIVITY_TOP]
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
