"""Paired statistics: every record against the baseline scored on the same windows and questions.

Δppl is a paired bootstrap over windows (none below MIN_WINDOWS_FOR_CI windows), task deltas pair
answers question by question (McNemar), and categories pool their tasks' questions.
"""

from __future__ import annotations

from .config import MIN_WINDOWS_FOR_CI


def _perplexity_delta(r: dict, base: dict) -> None:
    """`perplexity_delta` of r against base, paired over their (identical) windows, with its interval."""
    from ..evaluate import stats

    d, lo, hi = stats.paired_ratio_bootstrap_ci(base["window_nll"], base["window_tokens"],
                                                r["window_nll"], r["window_tokens"])
    r["perplexity_delta"] = d
    if len(r["window_nll"]) < MIN_WINDOWS_FOR_CI:
        # resampling 1-4 windows gives a degenerate, far too narrow interval: give none
        r["perplexity_delta_ci"], r["perplexity_delta_significant"] = None, False
    else:
        r["perplexity_delta_ci"] = [lo, hi]
        r["perplexity_delta_significant"] = stats.significant(lo, hi)


def add_paired_statistics(records: list[dict]) -> None:
    """Paired deltas against the baseline row (same windows, same questions), in place.

    A run directory can hold baselines scored on different windows: formats that calibrate on the
    head of the text (GPTQ/AWQ, mixed-auto) shift the evaluation windows past it, and `recommend`
    measures such formats in their own comparison. Each record is paired with the baseline scored on
    its windows (same `window_start_token`)."""

    baselines = [r for r in records if r.get("baseline") and "error" not in r]
    if not baselines:
        return
    by_start = {}
    for b in baselines:
        by_start.setdefault(b.get("window_start_token"), b)
    for r in records:
        if "error" in r or "window_nll" not in r:
            continue
        base = by_start.get(r.get("window_start_token"), baselines[0])
        if r is base or r.get("baseline"):
            r["perplexity_delta"], r["perplexity_delta_ci"] = 0.0, [0.0, 0.0]
        else:
            _perplexity_delta(r, base)
        for L, cell in (r.get("ctx_sweep") or {}).items():
            base_cell = (base.get("ctx_sweep") or {}).get(L)
            if r is base or r.get("baseline"):
                cell["perplexity_delta"], cell["perplexity_delta_ci"] = 0.0, [0.0, 0.0]
            elif base_cell and "window_nll" in cell and "window_nll" in base_cell:
                _perplexity_delta(cell, base_cell)
        if "generation" in r:
            from ..evaluate.generation import summarize

            g = r["generation"]
            r["gen_agreement"] = summarize(g, g["tokens"], g.get("kinds"))
        if "task_items" in r:
            r["tasks"] = _task_summaries(r, base)
            if r is not base and not r.get("baseline"):
                r["task_categories"] = _category_summaries(r, base)
    from .recovery import add_recovery_statistics

    add_recovery_statistics(records)  # LoRA-recovered rows: the share of their format's gap won back


def _task_summaries(r: dict, base: dict) -> dict:
    """{task: {n, acc, acc_ci, acc_norm, acc_norm_ci, delta, delta_ci, mcnemar_p, significant}}, paired
    with the baseline's answers to the same questions."""
    from ..evaluate.tasks import CATEGORIES, TaskScores, cloze_perplexity, summarize

    out = {}
    for name, items in r["task_items"].items():
        s = TaskScores.from_dict(items)
        b_items = base.get("task_items", {}).get(name) if r is not base else None
        b = TaskScores.from_dict(b_items) if b_items else None
        summary = summarize(s, b)
        if s.target_nll is not None:  # cloze tasks (LAMBADA): the target word's perplexity too
            summary.update(cloze_perplexity(s, b))
        plain = name.removeprefix("lm-eval:").replace("_", "-")  # lm-eval's arc_easy is our arc-easy
        summary["category"] = CATEGORIES.get(name, CATEGORIES.get(plain, "user"))
        out[name] = summary
    return out


def _category_summaries(r: dict, base: dict) -> dict:
    """{category: pooled paired accuracy delta} over the tasks both records answered."""
    from ..evaluate.tasks import TaskScores, category_deltas

    pairs = {name: (TaskScores.from_dict(items), TaskScores.from_dict(base["task_items"][name]))
             for name, items in r["task_items"].items() if name in base.get("task_items", {})}
    return category_deltas(pairs, {n: r["tasks"][n]["category"] for n in pairs}) if pairs else {}


def paired_tasks(r: dict, ref: dict) -> dict:
    """`r`'s task accuracy paired with any other record `ref` answering the same questions (GPTQ against
    round-to-nearest on the same grid, say): a record-shaped dict whose deltas are r minus ref."""
    tasks = _task_summaries(r, ref)
    return {"format": f"{r['format']} - {ref['format']}", "tasks": tasks,
            "task_categories": _category_summaries({**r, "tasks": tasks}, ref)}
