"""Terminal tables: what `compare`, `show`, `sweep`, `sensitivity`, `recommend` and `plan` print.

Pure functions from records (or plan rows) to text; the CLI prints them, benchmarks import them.
The HTML and Markdown reports' tables are :mod:`.tables`.
"""

from __future__ import annotations

import math

from .fmt import REF_NOTE, fmt_bytes, speed_mark


def _fmt(x, spec=".3f", none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)

def comparison_table(records: list[dict]) -> str:
    """The side-by-side table printed by `quantscope compare` and `quantscope show`."""
    head = ["format", "bits/w", "weights", "perplexity", "Δppl [95% CI]", "KLD mean", "KLD p99", "top-1",
            "prefill t/s", "decode t/s", "quant s", "peak RSS"]
    rows, skipped = [], []
    for r in records:
        if r.get("error"):  # a line of its own after the columns: the reason never widens them
            skipped.append((r["format"], "skipped: " + r["error"]))
            continue
        delta = _delta_cell(r)
        rows.append([
            # compare --reference: the baseline row is another model
            f"{r['format']} (reference: {r['reference_model']})" if r.get("baseline") and r.get("reference_model")
            else r["format"], _fmt(r.get("bits_per_weight"), ".2f"), fmt_bytes(r.get("weight_bytes")),
            f"{r['perplexity']:.3f}±{r['perplexity_stderr']:.3f}", delta,
            f"{r['kld_mean']:.4f}±{r['kld_stderr']:.4f}", _fmt(r.get("kld_p99"), ".3f"),
            f"{100 * r['top1_agreement']:.1f}%", _fmt(r.get("prefill_tokens_per_s"), ".0f") + speed_mark(r),
            _fmt(r.get("decode_tokens_per_s"), ".1f") + speed_mark(r), _fmt(r.get("quantize_seconds"), ".1f"),
            fmt_bytes(r.get("peak_rss_bytes")),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    widths[0] = max([widths[0]] + [len(f) for f, _ in skipped])
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"{f.ljust(widths[0])}  {why}" for f, why in skipped]
    if any(speed_mark(r) and r.get("decode_tokens_per_s") is not None for r in records if not r.get("error")):
        lines.append(REF_NOTE)
    return "\n".join(lines)


def task_table(records: list[dict], paired_with: str = "the baseline") -> str:
    names = sorted({t for r in records for t in (r.get("tasks") or {})})
    if not names:
        return ""
    lines = []
    for name in names:
        lines.append(f"\n{name}")
        for r in records:
            t = (r.get("tasks") or {}).get(name)
            if not t:
                continue
            ci = t.get("acc_ci") or [float("nan")] * 2
            line = f"  {r['format']:<22} n={t['n']:<5} acc {100 * t['acc']:.1f}% [{100 * ci[0]:.1f},{100 * ci[1]:.1f}]"
            if t.get("acc_norm") is not None:
                line += f"  acc_norm {100 * t['acc_norm']:.1f}%"
            if t.get("delta") is not None and not r.get("baseline"):
                dci = t["delta_ci"]
                sig = " *" if t.get("significant") else ""
                line += (f"  Δ {100 * t['delta']:+.1f} pts [{100 * dci[0]:+.1f},{100 * dci[1]:+.1f}]{sig}"
                         f"  McNemar p={t['mcnemar_p']:.3g}")
            fl = t.get("flips")
            if fl and not r.get("baseline"):
                line += f"  flips R→W {fl['right_to_wrong']} W→R {fl['wrong_to_right']} ({100 * fl['flip_rate']:.1f}%)"
            if t.get("perplexity") is not None:  # LAMBADA: the perplexity of the target word
                line += f"  last-word ppl {t['perplexity']:.2f}±{t['perplexity_stderr']:.2f}"
                pci = t.get("perplexity_delta_ci")
                if pci and not r.get("baseline"):
                    sig = " *" if pci[0] > 0 or pci[1] < 0 else ""
                    line += f" Δ {t['perplexity_delta']:+.2f} [{pci[0]:+.2f},{pci[1]:+.2f}]{sig}"
            lines.append(line)
    cats = sorted({c for r in records for c in (r.get("task_categories") or {})})
    if cats:
        lines.append(f"\nwhere each format loses: accuracy change per category, questions pooled, paired with {paired_with}")
        lines.append("  " + "format".ljust(22) + "".join(c.rjust(30) for c in cats))
        for r in records:
            tc = r.get("task_categories") or {}
            if not tc:
                continue
            cells = []
            for c in cats:
                t = tc.get(c)
                cell = "-" if t is None else (f"{100 * t['delta']:+.1f} [{100 * t['delta_ci'][0]:+.1f},"
                                              f"{100 * t['delta_ci'][1]:+.1f}]{' *' if t['significant'] else '  '}")
                cells.append(cell.rjust(30))
            lines.append("  " + r["format"].ljust(22) + "".join(cells))
        members: dict[str, set] = {c: set() for c in cats}
        for r in records:
            for c, t in (r.get("task_categories") or {}).items():
                members[c].update(t["tasks"])
        lines.append("  " + ", ".join(f"{c}: {' + '.join(sorted(members[c]))}" for c in cats))
    return "\n".join(lines)


def generation_table(records: list[dict]) -> str:
    """--gen-prompts: per format, agreement of its greedy continuations with the baseline's."""
    rows = [r for r in records if r.get("gen_agreement") and not r.get("error")]
    if not rows:
        return ""
    g0 = rows[0]["gen_agreement"]
    head = ["format", "exact match [95% CI]", "tokens to divergence [95% CI]", "KLD along baseline [95% CI]"]
    body = []
    for r in rows:
        g = r["gen_agreement"]
        em, dv, kd = g["exact_match_ci"], g["divergence_ci"], g["kld_ci"]
        body.append([r["format"], f"{100 * g['exact_match']:.0f}% [{100 * em[0]:.0f},{100 * em[1]:.0f}]",
                     f"{g['divergence_mean']:.1f} [{dv[0]:.1f},{dv[1]:.1f}]"
                     + (" *" if g.get("divergence_delta_significant") else ""),
                     f"{g['kld_mean']:.4f} [{kd[0]:.4f},{kd[1]:.4f}]" + (" *" if g.get("kld_significant") else "")])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [f"\ngeneration agreement: {g0['prompts']} prompts, {g0['tokens']} greedy tokens each, vs the baseline's "
             "(* = differs from the baseline's own: interval excludes it)"]
    lines += ["  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join(lines)


def _delta_cell(r: dict) -> str:
    """A record's (or a context-sweep cell's) Δppl with its paired interval, or why it has none."""
    ci = r.get("perplexity_delta_ci")
    if r.get("baseline"):
        return "baseline"
    if ci:
        sig = " *" if r.get("perplexity_delta_significant") else ""
        return f"{r['perplexity_delta']:+.3f} [{ci[0]:+.3f},{ci[1]:+.3f}]{sig}"
    if r.get("perplexity_delta") is not None:
        return f"{r['perplexity_delta']:+.3f} (no CI: <5 windows)"
    return "-"


def ctx_sweep_table(records: list[dict]) -> str:
    """--ctx-sweep: per format and context length, perplexity, its paired delta and KLD vs the baseline."""
    lens = sorted({int(L) for r in records for L in (r.get("ctx_sweep") or {})})
    if not lens:
        return ""
    head = ["format", "ctx", "tokens", "perplexity", "Δppl [95% CI]", "KLD mean", "top-1"]
    rows = []
    for r in records:
        for L in lens:
            c = (r.get("ctx_sweep") or {}).get(str(L))
            if not c:
                continue
            cell = {**c, "baseline": r.get("baseline")}
            rows.append([r["format"], str(L), str(c["tokens_scored"]),
                         f"{c['perplexity']:.3f}±{c['perplexity_stderr']:.3f}", _delta_cell(cell),
                         f"{c['kld_mean']:.4f}±{c['kld_stderr']:.4f}", f"{100 * c['top1_agreement']:.1f}%"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["\nlong context (--ctx-sweep): the same text in windows of each length, paired with the baseline"]
    lines += ["  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *rows]]
    return "\n".join(lines)

def sensitivity_table(rows: list[dict], top: int | None = None) -> str:
    shown = rows[:top] if top else rows
    total = sum(r["kld"] for r in rows) or float("nan")
    head = ["rank", "layer", "params", "bytes", "KLD mean", "± s.e.", "share"]
    body = [[str(i), r["name"] + (f" (+{', '.join(r['modules'][1:])})" if len(r["modules"]) > 1 and r["name"] == r["modules"][0] else ""),
             f"{r['params']:,}", fmt_bytes(r["bytes"]), f"{r['kld']:.4g}", f"{r['kld_stderr']:.2g}",
             f"{100 * r['kld'] / total:.1f}%"] for i, r in enumerate(shown, 1)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in body])

def trail_lines(decision) -> list[str]:
    lines = []
    for i, t in enumerate(decision.trail, 1):
        n = t.numbers
        got = []
        if "weight_bytes" in n:
            got.append(f"weights {fmt_bytes(n['weight_bytes'])}")
        if "perplexity" in n:
            ci = n.get("perplexity_delta_ci")
            got.append(f"ppl {n['perplexity']:.3f}" + (f" (Δ [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else ""))
        if "kld_mean" in n:
            got.append(f"KLD {n['kld_mean']:.4g}±{n.get('kld_stderr', float('nan')):.2g}")
        if n.get("decode_tokens_per_s"):
            got.append(f"decode {n['decode_tokens_per_s']:.1f} t/s")
        lines.append(f"  {i}. {t.verdict.upper():<7} {t.format} ({t.step})" + (f": {', '.join(got)}" if got else ""))
        lines.append(f"     {t.why}")
    return lines

def plan_table(rows, devices, custom) -> str:
    """The `quantscope plan` table: exact weights and KV cache, estimated overhead, where it fits."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    usable = {d.name: d.usable_bytes for d in devices}
    head = ["format", "bits/w", "weights", "KV cache", "overhead*", "total", "smallest listed device that fits"]
    head += [d.name for d in custom]
    body = []
    for r in rows:
        listed = [n for n in r.fits if n not in {d.name for d in custom}]
        smallest = min(listed, key=usable.__getitem__) if listed else "none"
        body.append([r.format, f"{r.bits_per_weight:.2f}", gb(r.weight_bytes), gb(r.kv_cache_bytes),
                     gb(r.overhead_bytes), gb(r.total_bytes), smallest]
                    + ["yes" if d.name in r.fits else "no" for d in custom])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in body])

def formats_table(rows: list[dict]) -> str:
    """`quantscope formats`: one line per format, then how to read the names."""
    w = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        inst = "yes" if r["installed"] else "no"
        line = f"{r['name']:<{w}}  {r['backend']:<14} {inst:<3} {r['bits_per_weight']:5.2f}  {r['description']}"
        lines.append(line + (f"  [{r['note']}]" if r["note"] else ""))
    lines += ["", "bits/w: own formats at a 1536x576 layer (codes + 16-bit scales/zeros); backends: code bits.",
              "intN-gG takes any N in 2..8 and any group size G; add -sym for symmetric.",
              "mixed precision: mixed-edges:BASE/WIDE (first and last blocks in WIDE) and",
              "mixed-auto:BPW:F1/F2/... (per-layer formats allocated by measured sensitivity to BPW bits/weight)."]
    return "\n".join(lines)


def record_notes(records: list[dict]) -> list[str]:
    """One line per distinct note of a measured format (what the table cannot say: ragged groups, a
    calibration that overlaps, a library's substitution); the baseline's own "reference row" note is the
    table's header already."""
    lines = []
    for r in records:
        for n in r.get("notes") or []:
            if not str(n).startswith("reference row"):
                lines.append(f"note ({r.get('format')}): {n}")
    return list(dict.fromkeys(lines))
