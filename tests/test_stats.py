"""Tests for quantscope.evaluate.stats against hand-computed values and basic properties."""

import math

import numpy as np
import pytest

from quantscope.evaluate import stats


def test_mean_stderr_matches_formula():
    x = [1.0, 2.0, 4.0, 7.0]
    mean, se = stats.mean_stderr(x)
    assert mean == pytest.approx(3.5)
    # sample variance: ((2.5^2 + 1.5^2 + 0.5^2 + 3.5^2) / 3) = 21 / 3 = 7
    assert se == pytest.approx(math.sqrt(7 / 4))
    assert math.isnan(stats.mean_stderr([5.0])[1])
    with pytest.raises(ValueError):
        stats.mean_stderr([])


def test_window_perplexity_stderr_is_the_delta_method():
    from quantscope.evaluate.perplexity import WindowScores

    rng = np.random.default_rng(1)
    nll = rng.gamma(2.0, 1.3, size=500)
    summary = WindowScores(nll=[nll[:200], nll[200:]]).summary()
    ppl = math.exp(nll.mean())
    assert summary["perplexity"] == pytest.approx(ppl)
    # llama.cpp: ppl * sqrt((E[x^2] - E[x]^2) / (n - 1)), the sample std over sqrt(n) times ppl
    var = (nll**2).mean() - nll.mean() ** 2
    assert summary["perplexity_stderr"] == pytest.approx(ppl * math.sqrt(var / (nll.size - 1)), rel=1e-9)
    assert summary["window_nll"] == pytest.approx([nll[:200].sum(), nll[200:].sum()])
    # constant NLL: no spread, zero error
    assert WindowScores(nll=[np.full(10, 2.0)]).summary()["perplexity_stderr"] == 0.0

def test_wilson_matches_hand_computed_value():
    # 8 / 10 at z = 1.96: centre 0.99208 / 1.38416, half 1.96 * sqrt(0.025604) / 1.38416
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.490157, abs=1e-6)
    assert hi == pytest.approx(0.943319, abs=1e-6)
    # the edges stay inside [0, 1] and are not degenerate
    lo0, hi0 = stats.wilson_interval(0, 20)
    assert lo0 == 0.0 and hi0 == pytest.approx(3.8416 / 23.8416, abs=1e-9)
    lo1, hi1 = stats.wilson_interval(20, 20)
    assert hi1 == 1.0 and lo1 == pytest.approx(20 / 23.8416, abs=1e-9)
    with pytest.raises(ValueError):
        stats.wilson_interval(3, 0)


def test_mcnemar_matches_hand_computed_values():
    assert stats.mcnemar_exact_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert stats.mcnemar_exact_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.mcnemar_exact_p(5, 5) == 1.0  # capped
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    assert stats.mcnemar_exact_p(0, 30) == pytest.approx(2 / 2**30)
    # symmetric in its arguments, and exact for large counts (no overflow)
    assert stats.mcnemar_exact_p(400, 520) == stats.mcnemar_exact_p(520, 400)
    assert 0.0 < stats.mcnemar_exact_p(400, 520) < 0.001


def test_significant():
    assert stats.significant(0.01, 0.2)
    assert stats.significant(-0.3, -0.1)
    assert not stats.significant(-0.1, 0.2)
    assert not stats.significant(0.0, 0.0)
    assert not stats.significant(None, 0.5)
    assert not stats.significant(float("nan"), 0.5)


def _paired_binary(n, rng, p_a=0.6, flip=0.1):
    a = rng.random(n) < p_a
    b = np.where(rng.random(n) < flip, ~a, a)
    return a.astype(float), b.astype(float)


def test_paired_bootstrap_identical_inputs_give_zero():
    rng = np.random.default_rng(0)
    a, _ = _paired_binary(300, rng)
    delta, lo, hi = stats.paired_bootstrap_ci(a, a.copy())
    assert (delta, lo, hi) == (0.0, 0.0, 0.0)
    assert lo <= 0.0 <= hi and not stats.significant(lo, hi)


def test_paired_bootstrap_interval_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (100, 1600):
        a, b = _paired_binary(n, rng)
        delta, lo, hi = stats.paired_bootstrap_ci(a, b, seed=1)
        assert delta == pytest.approx(b.mean() - a.mean())
        assert lo <= delta <= hi
        widths[n] = hi - lo
    # the width scales like 1/sqrt(n): 16x the items, about a quarter of the width
    assert widths[1600] < widths[100] / 2.5


def test_paired_bootstrap_is_reproducible_and_detects_a_real_difference():
    rng = np.random.default_rng(3)
    a = (rng.random(500) < 0.7).astype(float)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a), 60, replace=False)] = 0.0  # the candidate loses 60 right answers
    r1 = stats.paired_bootstrap_ci(a, b, seed=5)
    r2 = stats.paired_bootstrap_ci(a, b, seed=5)
    assert r1 == r2
    delta, lo, hi = r1
    assert delta == pytest.approx(-60 / 500)
    assert hi < 0 and stats.significant(lo, hi)
    # paired vs a naive interval from two independent Wilson intervals: pairing is much tighter
    wa = stats.wilson_interval(int(a.sum()), a.size)
    assert hi - lo < (wa[1] - wa[0])


def test_paired_bootstrap_rejects_unpaired_lengths():
    with pytest.raises(ValueError):
        stats.paired_bootstrap_ci([1, 0, 1], [1, 0])


def test_paired_ratio_bootstrap():
    rng = np.random.default_rng(2)
    tok = rng.integers(400, 512, size=40).astype(float)
    nll = tok * rng.normal(2.6, 0.2, size=40)
    assert stats.paired_ratio_bootstrap_ci(nll, tok, nll, tok) == (0.0, 0.0, 0.0)
    worse = nll + 0.05 * tok  # every token 0.05 nats worse
    delta, lo, hi = stats.paired_ratio_bootstrap_ci(nll, tok, worse, tok)
    expected = math.exp(worse.sum() / tok.sum()) - math.exp(nll.sum() / tok.sum())
    assert delta == pytest.approx(expected)
    assert 0 < lo <= delta <= hi
    with pytest.raises(ValueError):
        stats.paired_ratio_bootstrap_ci(nll, tok, nll[:-1], tok)
