"""Confidence intervals for every score: a seeded percentile bootstrap over items, or over clusters
(the questions of one context, the pairs of one document) where items are not independent, and
the paired bootstrap of a difference between two models scored on the same items.

The method is written beside each interval (:func:`method`), so a results file says how it was
made.  ``tests/test_uncertainty.py`` checks the intervals against ``scipy.stats.bootstrap``.
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def _groups(n: int, clusters: Sequence[Hashable] | None) -> list[np.ndarray]:
    if clusters is None:
        return [np.array([i]) for i in range(n)]
    index: dict = {}
    for i, c in enumerate(clusters):
        index.setdefault(c, []).append(i)
    return [np.array(v) for v in index.values()]


def _resampled_means(columns: Sequence[np.ndarray], clusters, resamples: int, seed: int) -> np.ndarray:
    """For each resample, the mean of each column over the drawn items (clusters drawn whole):
    an array (resamples, columns)."""
    n = len(columns[0])
    groups = _groups(n, clusters)
    rng = np.random.default_rng(seed)
    k = len(groups)
    sums = np.stack([np.array([c[g].sum() for g in groups]) for c in columns], axis=1)  # (k, columns)
    sizes = np.array([len(g) for g in groups], dtype=float)
    draws = rng.integers(0, k, size=(resamples, k))
    return sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)[:, None]


def interval(values: Sequence[float], clusters: Sequence[Hashable] | None = None, *, resamples: int = RESAMPLES,
             seed: int = 0, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (None for fewer than 2 items)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return None
    means = _resampled_means([v], clusters, resamples, seed)[:, 0]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float], *, resamples: int = RESAMPLES,
                   seed: int = 0, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators) over the units they
    belong to (e.g. the loss per token over conversations: each one's summed loss and its tokens)."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if len(num) < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    ratios = num[draws].sum(axis=1) / den[draws].sum(axis=1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable] | None = None, *,
                      resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict | None:
    """mean(b) − mean(a) on the same items, its paired bootstrap interval (the same draws for
    both), and whether that interval excludes zero."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError("paired_difference: the two models were scored on different numbers of items")
    if len(x) < 2:
        return None
    means = _resampled_means([y - x], clusters, resamples, seed)[:, 0]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(y.mean() - x.mean()), "ci": [float(lo), float(hi)],
            "significant": bool(lo > 0 or hi < 0)}


def resample_indices(n: int, clusters: Sequence[Hashable] | None = None, *, resamples: int = RESAMPLES,
                     seed: int = 0) -> list[np.ndarray]:
    """The item indices of each resample: ``n`` items drawn with replacement (the draws
    ``scipy.stats.bootstrap`` makes with the same generator), or whole clusters drawn with
    replacement and their items concatenated."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        return list(rng.integers(0, n, size=(resamples, n)))
    groups = _groups(n, clusters)
    draws = rng.integers(0, len(groups), size=(resamples, len(groups)))
    return [np.concatenate([groups[j] for j in d]) for d in draws]


Statistic = Callable[[np.ndarray], Mapping[str, float]]


def _percentiles(samples: list[Mapping[str, float]], level: float) -> dict[str, list[float]]:
    out = {}
    for name in samples[0]:
        v = np.array([s[name] for s in samples], dtype=float)
        v = v[np.isfinite(v)]
        if len(v):
            lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
            out[name] = [float(lo), float(hi)]
    return out


def statistic_intervals(statistic: Statistic, n: int, clusters: Sequence[Hashable] | None = None, *,
                        resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of each value of ``statistic(indices)`` (a dict of metrics
    computed on the items at ``indices``): for metrics that are not means of item scores
    (macro-F1, correlations, per-option F1).  Empty for fewer than 2 items."""
    if n < 2:
        return {}
    return _percentiles([statistic(idx) for idx in resample_indices(n, clusters, resamples=resamples, seed=seed)],
                        level)


def paired_statistic(statistic_a: Statistic, statistic_b: Statistic, n: int, clusters: Sequence[Hashable] | None = None,
                     *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, dict]:
    """For each metric, b − a on the same ``n`` items (two models' answers to them), the paired
    bootstrap interval of that difference (the same draws for both) and whether it excludes 0."""
    if n < 2:
        return {}
    full = np.arange(n)
    a0, b0 = statistic_a(full), statistic_b(full)
    diffs = []
    for idx in resample_indices(n, clusters, resamples=resamples, seed=seed):
        a, b = statistic_a(idx), statistic_b(idx)
        diffs.append({k: b[k] - a[k] for k in b0})
    out = {}
    for name, (lo, hi) in _percentiles(diffs, level).items():
        out[name] = {"difference": float(b0[name] - a0[name]), "ci": [lo, hi], "significant": bool(lo > 0 or hi < 0)}
    return out


def method(unit: str = "items", resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> str:
    return f"percentile bootstrap over {unit}, {resamples} resamples, seed {seed}, {round(level * 100)} % interval"


def fmt(value: float | None, ci: Sequence[float] | None, nd: int = 2) -> str:
    """``71.67 [60.00, 83.33]`` (the value alone when there is no interval)."""
    if value is None:
        return "–"
    if not ci:
        return f"{value:.{nd}f}"
    return f"{value:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def fmt_change(d: dict, nd: int = 2) -> str:
    """A paired difference: ``+48.33 [+30.00, +63.33] *`` (* where the interval excludes zero)."""
    lo, hi = d["ci"]
    return f"{d['difference']:+.{nd}f} [{lo:+.{nd}f}, {hi:+.{nd}f}]" + (" *" if d["significant"] else "")

