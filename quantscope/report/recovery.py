"""Terminal tables of LoRA recovery: what each recovered row won back of its format's gap, and its
training log (loss and held-out KLD per N steps)."""

from __future__ import annotations

import math

from .fmt import fmt_bytes


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.0f}%"


def _frac(cell: dict | None) -> str:
    if not cell:
        return "-"
    ci = cell.get("ci")
    out = _pct(cell["fraction"])
    if ci and not any(math.isnan(c) for c in ci):
        out += f" [{_pct(ci[0])},{_pct(ci[1])}]"
    return out + ("" if cell.get("gap_significant", True) else " (gap is noise)")


def recovery_table(records: list[dict]) -> str:
    """One line per recovered row: the share of its format's KLD and perplexity gap won back (95%
    paired bootstrap intervals over windows), adapter bytes, seconds per step and peak RSS."""
    rows = [r for r in records if r.get("recovered")]
    if not rows:
        return ""
    head = ["format", "vs", "KLD recovered [95% CI]", "ppl gap recovered [95% CI]", "adapter", "steps", "s/step",
            "train peak RSS"]
    body = []
    for r in rows:
        rec, rv = r.get("recover", {}), r["recovered"]
        sps = rec.get("seconds_per_step")
        body.append([r["format"], rv["vs"], _frac(rv.get("kld")), _frac(rv.get("perplexity")),
                     fmt_bytes(rec.get("adapter_bytes")) if rec.get("outcome") == "adapter" else "merged",
                     str(rec.get("steps", "-")), "-" if sps is None else f"{sps:.2f}",
                     fmt_bytes(rec.get("train_peak_rss_bytes"))])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["\nrecovered: the share of the format's gap to the baseline won back (1 - gap after / gap before)",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in body]
    for r in rows:
        for name, t in (r["recovered"].get("tasks") or {}).items():
            lines.append(f"  {r['format']} {name}: acc {100 * t['before']:.1f}% -> {100 * t['after']:.1f}% "
                         f"(baseline {100 * t['baseline']:.1f}%), gap recovered {_frac(t)}")
    return "\n".join(lines)


def training_log(records: list[dict]) -> str:
    """Each distinct training once: step, mean training loss since the last line, held-out KLD."""
    seen, lines = set(), []
    for r in records:
        rec = r.get("recover")
        if not rec or rec.get("training_folder") in seen:
            continue
        seen.add(rec.get("training_folder"))
        cfg = rec["config"]
        lines.append(f"\ntraining {r['format'].split('+')[0]}+lora ({cfg['objective']}, {cfg['init']} init, rank "
                     f"{cfg['rank']}, {rec['adapted_layers']} layers, {rec['trainable_params']:,} parameters, "
                     f"{rec['train_tokens']:,} training tokens)")
        if rec.get("loftq"):
            lq = rec["loftq"]
            lines.append(f"  LoftQ ({lq['loftq_iters']} iterations): relative weight error {lq['residual_before']:.4f} "
                         f"-> {lq['residual_after']:.4f} with the adapters")
        for e in rec.get("log", []):
            loss = "-" if e.get("loss") is None else f"{e['loss']:.4f}"
            kld = "-" if e.get("heldout_kld") is None else f"{e['heldout_kld']:.4f}"
            lines.append(f"  step {e['step']:>5}  loss {loss:>8}  held-out KLD {kld}")
    for r in records:
        kld = (r.get("recover") or {}).get("heldout_kld_merged")
        if kld is not None:
            lines.append(f"  {r['format']}: held-out KLD {kld:.4f} after merging and requantizing")
    return "\n".join(lines)
