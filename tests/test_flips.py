"""Answer flips against the baseline (Dutta et al. 2024): counted by hand on a built example."""

from __future__ import annotations

import numpy as np
import pytest

from quantscope.evaluate.tasks import TaskScores, flips, summarize
from quantscope.report.tables import task_rows
from quantscope.report.terminal import task_table


def _scores(correct):
    n = len(correct)
    return TaskScores(task="t", kind="multiple_choice", item_ids=[str(i) for i in range(n)],
                      loglik=[np.zeros(2)] * n, correct=np.asarray(correct, dtype=np.int8),
                      correct_norm=np.asarray(correct, dtype=np.int8))


def test_flips_by_hand():
    base = [1, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    cand = [1, 0, 1, 1, 0, 0, 1, 1, 1, 0]  # R->W at 1 and 5; W->R at 3 and 6: equal accuracy, 4 flips
    f = flips(base, cand)
    assert (f["right_to_wrong"], f["wrong_to_right"], f["n"]) == (2, 2, 10)
    assert f["right_to_wrong_rate"] == 0.2 and f["flip_rate"] == 0.4
    assert f["flip_rate_ci"][0] < 0.4 < f["flip_rate_ci"][1]
    s = summarize(_scores(cand), _scores(base))
    assert s["delta"] == 0.0 and s["flips"] == f  # accuracy unchanged, flips say otherwise
    assert summarize(_scores(base))["flips"] is None


def test_flips_in_tables():
    base, cand = _scores([1, 1, 0, 0]), _scores([0, 1, 1, 1])
    recs = [{"format": "fp32", "baseline": True, "tasks": {"t": summarize(base, base)}},
            {"format": "int4", "tasks": {"t": summarize(cand, base)}}]
    assert "flips R→W 1 W→R 2" in task_table(recs)
    _, rows = task_rows(recs)
    assert "flips R→W 1, W→R 2" in rows[1][1] and "flips" not in rows[0][1]


def test_no_flips_with_itself():
    f = flips([1, 0, 1], [1, 0, 1])
    assert f["right_to_wrong"] == f["wrong_to_right"] == 0
    with pytest.raises(ValueError):
        flips([], [])
