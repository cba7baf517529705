"""The report's tables as strings: comparison, task accuracy, recommendation trail, provenance.

Shared by the Markdown and HTML renderers (and usable for a terminal). Records are the flat dicts of
`quantscope.results`; missing or None fields render as `MISSING` ("—"); a record with an `error`
(a skipped format) is a row whose note gives the reason.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from quantscope.report.fmt import MISSING, fmt_bytes, fmt_num, fmt_pct, fmt_pm, num, speed_mark
from quantscope.results.record import Record

SENSITIVITY_TOP = 30  # layers shown in the sensitivity table and chart (the most sensitive ones)

COMPARISON_HEADERS = (
    "format", "bits/weight", "weight bytes", "perplexity", "KLD mean", "top-1 agree",
    "prefill tok/s", "decode tok/s", "quantize s", "peak RSS", "note",
)


def _bytes(value: Any) -> str:
    """A byte count for a table cell: MISSING (not fmt_bytes' "-") when it is absent or not finite."""
    v = num(value)
    return fmt_bytes(v) if v is not None and math.isfinite(v) else MISSING


def format_label(record: Record) -> str:
    label = str(record.get("format", "?"))
    if record.get("baseline") and record.get("reference_model"):  # compare --reference
        return f"{label} (reference: {record['reference_model']})"
    return f"{label} (baseline)" if record.get("baseline") else label


def comparison_rows(records: Iterable[Record]) -> tuple[tuple[str, ...], list[list[str]]]:
    """The comparison table as strings (headers, rows), for Markdown, HTML or a terminal."""
    rows = []
    for r in records:
        note = f"skipped: {r['error']}" if r.get("error") else "; ".join(map(str, r.get("notes") or []))
        rows.append([
            format_label(r),
            fmt_num(r.get("bits_per_weight"), 2),
            _bytes(r.get("weight_bytes")),
            fmt_pm(r.get("perplexity"), r.get("perplexity_stderr")),
            fmt_pm(r.get("kld_mean"), r.get("kld_stderr")),
            fmt_pct(r.get("top1_agreement")),
            fmt_num(r.get("prefill_tokens_per_s"), 1) + speed_mark(r),
            fmt_num(r.get("decode_tokens_per_s"), 1) + speed_mark(r),
            fmt_num(r.get("quantize_seconds"), 2),
            _bytes(r.get("peak_rss_bytes")),
            note,
        ])
    return COMPARISON_HEADERS, rows


def groups(records: Sequence[Record]) -> list[tuple[str, list[Record]]]:
    """Records split by what makes their numbers comparable: model, text, ctx, windows."""
    by_key: dict[tuple, list[Record]] = {}
    for r in records:
        by_key.setdefault((r.get("model"), r.get("text"), r.get("ctx"), r.get("windows")), []).append(r)
    return [
        (f"model {m} · text {t} · ctx {c} · {w} windows", rs) for (m, t, c, w), rs in by_key.items()
    ]


def task_names(records: Sequence[Record]) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        for name in (r.get("tasks") or {}):
            names[name] = None
    return list(names)


def interval(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, dict):
        ci = (ci.get("lo", ci.get("low")), ci.get("hi", ci.get("high")))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(num(x) is not None for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def task_rows(records: Sequence[Record]) -> tuple[list[str], list[list[str]]]:
    """Accuracy with its 95% interval per (format, task), and the paired delta when measured."""
    names = task_names(records)
    headers = ["format"] + names
    rows = []
    for r in records:
        if not r.get("tasks"):
            continue
        row = [format_label(r)]
        for name in names:
            t = (r.get("tasks") or {}).get(name) or {}
            cell = fmt_pct(t.get("acc"))
            ci = interval(t.get("acc_ci"))
            if ci and cell != MISSING:
                cell += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
            delta, dci = num(t.get("delta")), interval(t.get("delta_ci"))
            if delta is not None:
                cell += f"; Δ {100 * delta + 0.0:+.1f}"
                if dci:
                    cell += f" [{100 * dci[0]:+.1f}, {100 * dci[1]:+.1f}]"
            fl = t.get("flips")
            if fl and not r.get("baseline"):
                cell += f"; flips R→W {fl['right_to_wrong']}, W→R {fl['wrong_to_right']}"
            if t.get("n") is not None:
                cell += f" (n={t['n']})"
            row.append(cell)
        rows.append(row)
    return headers, rows


def generation_rows(records: Sequence[Record]) -> tuple[list[str], list[list[str]]]:
    """--gen-prompts: exact match, tokens to divergence and KLD along the baseline's continuations."""
    headers = ["format", "prompts", "tokens", "exact match [95% CI]", "tokens to divergence [95% CI]",
               "KLD along baseline [95% CI]"]
    rows = []
    for r in records:
        g = r.get("gen_agreement")
        if not g or r.get("error"):
            continue
        em, dv, kd = g["exact_match_ci"], g["divergence_ci"], g["kld_ci"]
        rows.append([format_label(r), str(g["prompts"]), str(g["tokens"]),
                     f"{100 * g['exact_match']:.0f}% [{100 * em[0]:.0f}, {100 * em[1]:.0f}]",
                     f"{g['divergence_mean']:.1f} [{dv[0]:.1f}, {dv[1]:.1f}]",
                     f"{g['kld_mean']:.4f} [{kd[0]:.4f}, {kd[1]:.4f}]"])
    return headers, rows


def recommendation_steps(meta: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    rec = meta.get("recommendation")
    if isinstance(rec, dict):
        steps = rec.get("steps") or []
        extra = {k: v for k, v in rec.items() if k != "steps"}
    else:
        steps, extra = (rec or []), {}
    return [s for s in steps if isinstance(s, dict)], extra


def recommendation_rows(meta: dict[str, Any]) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    steps, extra = recommendation_steps(meta)
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
                    + [plain(s.get(k)) for k in more])
    return headers, rows, extra


def plain(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sensitivity(meta: dict[str, Any]) -> list[tuple[str, float]]:
    entries = []
    for s in meta.get("sensitivity") or []:
        if isinstance(s, dict) and num(s.get("kld")) is not None:
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


def title(meta: dict[str, Any]) -> str:
    return f"quantscope report: {meta.get('name', 'run')}"


def summary(records: Sequence[Record]) -> str:
    skipped = [str(r.get("format")) for r in records if r.get("error")]
    text = f"{len(records)} record(s), {len(records) - len(skipped)} measured"
    return text + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else "") + "."
