"""How much of a format's loss LoRA recovery won back: each recovered row paired with the baseline and
with its format before recovery, on the same windows and questions.

For a row ``F+lora...`` beside ``F`` and the baseline, in ``record["recovered"]``:

- ``kld``: 1 - KLD(F+lora) / KLD(F) (the baseline's own KLD is zero);
- ``perplexity``: 1 - (ppl(F+lora) - ppl(base)) / (ppl(F) - ppl(base));
- ``tasks[name]``: 1 - (acc(base) - acc(F+lora)) / (acc(base) - acc(F));

each with a 95% paired bootstrap interval over windows (questions for tasks), resampling the same
units for all three rows (:func:`quantscope.evaluate.stats.recovered_fraction_ci`). 1 is the whole gap
closed, 0 nothing won, below 0 worse than before. A gap that is noise (its own interval includes
zero) makes the fraction meaningless; ``gap_significant`` says whether it was.
"""

from __future__ import annotations

import numpy as np

from .config import MIN_WINDOWS_FOR_CI


def _window_arrays(r: dict, key: str) -> np.ndarray:
    return np.asarray(r[key], dtype=np.float64)


def _kld(before: dict, after: dict) -> dict | None:
    from ..evaluate import stats

    if "window_kld" not in before or "window_kld" not in after:
        return None
    kb, ka = _window_arrays(before, "window_kld"), _window_arrays(after, "window_kld")
    t = _window_arrays(after, "window_tokens")
    frac, lo, hi = stats.recovered_fraction_ci(lambda i: kb[i].sum(-1) / t[i].sum(-1),
                                               lambda i: ka[i].sum(-1) / t[i].sum(-1), len(t))
    return {"fraction": frac, "ci": _ci(lo, hi, len(t)), "before": before.get("kld_mean"), "after": after.get("kld_mean"),
            "gap_significant": bool(before.get("kld_mean", 0) > 0)}


def _perplexity(base: dict, before: dict, after: dict) -> dict:
    from ..evaluate import stats

    nb, n0, na = (_window_arrays(r, "window_nll") for r in (base, before, after))
    t = _window_arrays(base, "window_tokens")

    def ppl(nll, i):
        return np.exp(nll[i].sum(-1) / t[i].sum(-1))

    frac, lo, hi = stats.recovered_fraction_ci(lambda i: ppl(n0, i) - ppl(nb, i), lambda i: ppl(na, i) - ppl(nb, i),
                                               len(t))
    return {"fraction": frac, "ci": _ci(lo, hi, len(t)), "before": before.get("perplexity"),
            "after": after.get("perplexity"), "gap_significant": bool(before.get("perplexity_delta_significant"))}


def _tasks(base: dict, before: dict, after: dict) -> dict:
    from ..evaluate import stats
    from ..evaluate.tasks import TaskScores

    out = {}
    for name, items in after.get("task_items", {}).items():
        if name not in before.get("task_items", {}) or name not in base.get("task_items", {}):
            continue
        cb, c0, ca = (np.asarray(TaskScores.from_dict(r["task_items"][name]).correct, dtype=np.float64)
                      for r in (base, before, after))
        if not len(cb) == len(c0) == len(ca):
            continue
        frac, lo, hi = stats.recovered_fraction_ci(lambda i: cb[i].mean(-1) - c0[i].mean(-1),
                                                   lambda i: cb[i].mean(-1) - ca[i].mean(-1), len(cb))
        out[name] = {"fraction": frac, "ci": [lo, hi], "before": float(c0.mean()), "after": float(ca.mean()),
                     "baseline": float(cb.mean()),
                     "gap_significant": bool((before.get("tasks") or {}).get(name, {}).get("significant"))}
    return out


def _ci(lo: float, hi: float, n: int) -> list[float] | None:
    return [lo, hi] if n >= MIN_WINDOWS_FOR_CI else None  # too few windows to resample (see pairing)


def add_recovery_statistics(records: list[dict]) -> None:
    """`recovered` on every LoRA-recovered record whose base format and baseline are in `records`
    (scored on the same windows), in place."""
    ok = [r for r in records if "error" not in r and "window_nll" in r]
    for r in ok:
        rec = r.get("recover")
        if not rec:
            continue
        start = r.get("window_start_token")
        base = next((b for b in ok if b.get("baseline") and b.get("window_start_token") == start), None)
        before = next((b for b in ok if b["format"] == rec["base"] and b.get("window_start_token") == start), None)
        if base is None or before is None or len(before["window_nll"]) != len(r["window_nll"]):
            continue
        out = {"vs": before["format"], "perplexity": _perplexity(base, before, r)}
        kld = _kld(before, r)
        if kld is not None:
            out["kld"] = kld
        tasks = _tasks(base, before, r)
        if tasks:
            out["tasks"] = tasks
        r["recovered"] = out
