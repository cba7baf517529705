"""Summaries of task scores: accuracy with Wilson intervals, paired deltas against a baseline,
per-category pooled deltas, and a cloze task's target-word perplexity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from quantscope.errors import QuantscopeError
from quantscope.evaluate import stats
from quantscope.evaluate.tasks.items import TaskScores


def _check_paired(scores: TaskScores, baseline: TaskScores) -> None:
    if scores.task != baseline.task or scores.item_ids != baseline.item_ids:
        raise QuantscopeError(
            f"cannot pair {scores.task} ({len(scores.item_ids)} items) with baseline "
            f"{baseline.task} ({len(baseline.item_ids)} items): not the same questions"
        )


def _acc_ci(correct: np.ndarray) -> tuple[float, list[float]]:
    k, n = int(correct.sum()), int(correct.size)
    lo, hi = stats.wilson_interval(k, n)
    return k / n, [lo, hi]


def summarize(
    scores: TaskScores, baseline_scores: TaskScores | None = None, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """``{n, acc, acc_ci, acc_norm, acc_norm_ci, delta, delta_ci, mcnemar_p, significant, flips}``.

    Intervals are 95% Wilson intervals. ``delta`` = acc - baseline acc on the same items, with a
    paired bootstrap interval and the exact McNemar p-value; ``significant`` is True when
    ``delta_ci`` excludes zero; ``flips`` counts the answers that changed (:func:`flips`). Without a
    baseline the comparison fields are None. For cloze
    tasks (lambada) ``acc_norm`` and ``acc_norm_ci`` are None; see ``cloze_perplexity``.
    """
    acc, acc_ci = _acc_ci(scores.correct)
    acc_norm, acc_norm_ci = (None, None) if scores.correct_norm is None else _acc_ci(scores.correct_norm)
    out: dict[str, Any] = {
        "n": int(scores.correct.size),
        "acc": acc,
        "acc_ci": acc_ci,
        "acc_norm": acc_norm,
        "acc_norm_ci": acc_norm_ci,
        "delta": None,
        "delta_ci": None,
        "mcnemar_p": None,
        "significant": None,
        "flips": None,
    }
    if baseline_scores is not None:
        _check_paired(scores, baseline_scores)
        a, b = baseline_scores.correct.astype(bool), scores.correct.astype(bool)
        delta, lo, hi = stats.paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed)
        out["delta"] = delta
        out["delta_ci"] = [lo, hi]
        out["mcnemar_p"] = stats.mcnemar_exact_p(int((a & ~b).sum()), int((~a & b).sum()))
        out["significant"] = stats.significant(lo, hi)
        out["flips"] = flips(a, b)
    return out


def flips(baseline_correct, correct) -> dict[str, Any]:
    """Answers that changed against the baseline's (Dutta et al. 2024, "Accuracy is Not All You Need"):
    right->wrong and wrong->right counts, their rates over all n questions with Wilson 95% intervals.
    Equal accuracy can hide many flips in both directions."""
    a, b = np.asarray(baseline_correct, dtype=bool), np.asarray(correct, dtype=bool)
    n = int(a.size)
    if n == 0 or a.shape != b.shape:
        raise ValueError(f"flips needs two aligned, non-empty answer arrays (got {a.size} and {b.size})")
    rw, wr = int((a & ~b).sum()), int((~a & b).sum())
    return {"n": n, "right_to_wrong": rw, "wrong_to_right": wr,
            "right_to_wrong_rate": rw / n, "right_to_wrong_ci": list(stats.wilson_interval(rw, n)),
            "wrong_to_right_rate": wr / n, "wrong_to_right_ci": list(stats.wilson_interval(wr, n)),
            "flip_rate": (rw + wr) / n, "flip_rate_ci": list(stats.wilson_interval(rw + wr, n))}


def category_deltas(pairs: dict[str, tuple[TaskScores, TaskScores]], categories: dict[str, str],
                    n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Where a format loses: per category, the accuracy change over all its tasks' questions pooled
    (each question once, so larger tasks weigh more), paired with the baseline's answers.

    `pairs` maps task name -> (scores, baseline scores); `categories` task name -> category.
    Returns ``{category: {tasks, n, delta, delta_ci, mcnemar_p, significant}}``."""
    grouped: dict[str, list[str]] = {}
    for name in pairs:
        grouped.setdefault(categories[name], []).append(name)
    out = {}
    for cat, names in sorted(grouped.items()):
        for name in names:
            _check_paired(*pairs[name])
        b = np.concatenate([pairs[n][1].correct.astype(bool) for n in names])
        a = np.concatenate([pairs[n][0].correct.astype(bool) for n in names])
        delta, lo, hi = stats.paired_bootstrap_ci(b, a, n_boot=n_boot, seed=seed)
        out[cat] = {"tasks": sorted(names), "n": int(a.size), "delta": delta, "delta_ci": [lo, hi],
                    "mcnemar_p": stats.mcnemar_exact_p(int((b & ~a).sum()), int((~b & a).sum())),
                    "significant": stats.significant(lo, hi)}
    return out


def cloze_perplexity(
    scores: TaskScores, baseline_scores: TaskScores | None = None, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Target-word perplexity of a cloze task (lm-eval's ``exp(mean per-item NLL)``).

    Returns ``{perplexity, perplexity_stderr, perplexity_delta, perplexity_delta_ci}``; the stderr
    is the delta method on the mean per-item NLL, the delta interval a paired bootstrap over items.
    """
    if scores.target_nll is None:
        raise QuantscopeError(f"task {scores.task} is not a cloze task: it has no target perplexity")
    mean, se = stats.mean_stderr(scores.target_nll)
    ppl = math.exp(mean)
    out: dict[str, Any] = {
        "perplexity": ppl,
        "perplexity_stderr": ppl * se,
        "perplexity_delta": None,
        "perplexity_delta_ci": None,
    }
    if baseline_scores is not None:
        _check_paired(scores, baseline_scores)
        delta, lo, hi = stats.paired_bootstrap_ci(
            baseline_scores.target_nll, scores.target_nll, stat="exp_mean", n_boot=n_boot, seed=seed
        )
        out["perplexity_delta"] = delta
        out["perplexity_delta_ci"] = [lo, hi]
    return out
