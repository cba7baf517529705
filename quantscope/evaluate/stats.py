"""Statistics for honest comparisons: standard errors, Wilson intervals, paired bootstrap, exact McNemar.

Pure numeric (numpy + math). scipy is deliberately not a dependency: the few formulas needed here
(Wilson's score interval, a binomial tail for McNemar, a percentile bootstrap) are short, and
writing them out keeps the install small and makes every number traceable to a line of code.

Conventions:
- Intervals are two-sided at level ``1 - alpha`` (95% by default) and returned as ``(lo, hi)``.
- Paired deltas are always "candidate minus baseline": ``b - a`` where ``a`` is the baseline.
- Bootstrap intervals are percentile intervals over ``n_boot`` resamples of the *paired* units
  (questions or windows), drawn with a fixed ``seed`` so that a result is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# The two-sided 95% normal quantile, for intervals of the form mean +- Z95 x standard error.
Z95 = 1.959963984540054

# Resample this many bootstrap replicates at a time, so memory stays bounded for long arrays.
_BOOT_CHUNK = 256


def mean_stderr(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with ddof=1, over sqrt(n)).

    The standard error is NaN for a single value (it cannot be estimated).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_stderr of an empty sequence")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan")
    return mean, float(x.std(ddof=1) / math.sqrt(x.size))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (well-behaved at 0 and n)."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _stat_fn(stat: str | Callable[..., np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A statistic reducing the last axis: "mean", "exp_mean" (perplexity of mean NLL) or a callable."""
    if callable(stat):
        return lambda x: np.asarray(stat(x, axis=-1))
    if stat == "mean":
        return lambda x: x.mean(axis=-1)
    if stat == "exp_mean":
        return lambda x: np.exp(x.mean(axis=-1))
    raise ValueError(f"unknown bootstrap statistic {stat!r} (use 'mean', 'exp_mean' or a callable)")


def _percentile_interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _boot_indices(rng: np.random.Generator, n: int, n_boot: int):
    """Yield blocks of resampling index rows, shape ``[chunk, n]``, ``n_boot`` rows in total."""
    done = 0
    while done < n_boot:
        m = min(_BOOT_CHUNK, n_boot - done)
        yield rng.integers(0, n, size=(m, n))
        done += m


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    stat: str | Callable[..., np.ndarray] = "mean",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Paired bootstrap of ``stat(b) - stat(a)`` over per-item arrays; returns ``(delta, lo, hi)``.

    ``a`` (baseline) and ``b`` (candidate) are aligned: element i of each is the same question or
    window. Each replicate resamples item indices once and applies them to both arrays, so the
    interval reflects the variability of the *difference*, which is much smaller than that of two
    independent accuracies when the two models mostly agree. ``delta`` is the full-sample value.
    """
    xa = np.asarray(a, dtype=np.float64).ravel()
    xb = np.asarray(b, dtype=np.float64).ravel()
    if xa.shape != xb.shape:
        raise ValueError(f"paired arrays differ in length: {xa.size} vs {xb.size}")
    if xa.size == 0:
        raise ValueError("paired_bootstrap_ci of empty arrays")
    f = _stat_fn(stat)
    delta = float(f(xb) - f(xa))
    rng = np.random.default_rng(seed)
    reps = np.concatenate([f(xb[idx]) - f(xa[idx]) for idx in _boot_indices(rng, xa.size, n_boot)])
    lo, hi = _percentile_interval(reps, alpha)
    return delta, lo, hi


def paired_ratio_bootstrap_ci(
    nll_a: Sequence[float] | np.ndarray,
    tokens_a: Sequence[float] | np.ndarray,
    nll_b: Sequence[float] | np.ndarray,
    tokens_b: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Perplexity delta (candidate minus baseline) with a paired bootstrap over windows.

    Inputs are per-window sums: ``nll_x[i]`` is the summed token NLL of window i and
    ``tokens_x[i]`` its token count. Perplexity is the ratio estimator
    ``exp(sum(nll) / sum(tokens))``; each replicate resamples windows (the same indices for both
    models) and recomputes both perplexities. Returns ``(delta, lo, hi)``.
    """
    na, ta, nb, tb = (np.asarray(x, dtype=np.float64).ravel() for x in (nll_a, tokens_a, nll_b, tokens_b))
    if not (na.size == ta.size == nb.size == tb.size):
        raise ValueError(f"per-window arrays differ in length: {na.size}, {ta.size}, {nb.size}, {tb.size}")
    if na.size == 0:
        raise ValueError("paired_ratio_bootstrap_ci of empty arrays")

    def ppl(nll: np.ndarray, tok: np.ndarray) -> np.ndarray:
        return np.exp(nll.sum(axis=-1) / tok.sum(axis=-1))

    delta = float(ppl(nb, tb) - ppl(na, ta))
    rng = np.random.default_rng(seed)
    reps = np.concatenate(
        [ppl(nb[idx], tb[idx]) - ppl(na[idx], ta[idx]) for idx in _boot_indices(rng, na.size, n_boot)]
    )
    lo, hi = _percentile_interval(reps, alpha)
    return delta, lo, hi


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test: a binomial(b + c, 1/2) test on the discordant pairs.

    ``b`` = items the baseline got right and the candidate wrong, ``c`` = the reverse.
    ``p = min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``, computed with exact
    integers so large counts neither overflow nor lose precision.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact_p needs non-negative counts, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def significant(lo: float | None, hi: float | None) -> bool:
    """True when the interval ``[lo, hi]`` excludes zero (False if either end is missing or NaN)."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return False
    return lo > 0 or hi < 0


def recovered_fraction_ci(
    gap_before: Callable[[np.ndarray], np.ndarray],
    gap_after: Callable[[np.ndarray], np.ndarray],
    n: int,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """The fraction of a gap won back, ``1 - gap_after / gap_before``, with a paired bootstrap over the
    ``n`` shared units (windows or questions); returns ``(fraction, lo, hi)``.

    ``gap_before(idx)`` and ``gap_after(idx)`` take resampled unit indices ``[m, n]`` and return the
    ``m`` gaps (a format's KLD, its perplexity or accuracy distance from the baseline) computed on those
    units; both see the same indices, so the interval reflects the variability of the pair. 1 means
    the gap is closed, 0 nothing won, below 0 worse than before recovery. Replicates whose gap before
    is zero are dropped (the fraction is undefined there); NaN when the gap before is zero itself.
    """
    if n <= 0:
        raise ValueError("recovered_fraction_ci needs at least one unit")
    full = np.arange(n)[None]
    before, after = float(gap_before(full)[0]), float(gap_after(full)[0])
    frac = 1.0 - after / before if before != 0 else float("nan")
    rng = np.random.default_rng(seed)
    reps = []
    for idx in _boot_indices(rng, n, n_boot):
        b, a = gap_before(idx), gap_after(idx)
        ok = b != 0
        reps.append(1.0 - a[ok] / b[ok])
    reps = np.concatenate(reps)
    if reps.size == 0 or math.isnan(frac):
        return frac, float("nan"), float("nan")
    lo, hi = _percentile_interval(reps, alpha)
    return frac, lo, hi
