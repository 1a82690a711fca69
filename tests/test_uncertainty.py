"""Bootstrap intervals against scipy.stats.bootstrap on the same data."""

from __future__ import annotations

import numpy as np
import pytest

from glotkit.eval.uncertainty import fmt, interval, paired_difference


def _scipy(values, seed, resamples=1000):
    from scipy.stats import bootstrap

    r = bootstrap((np.asarray(values, dtype=float),), np.mean, n_resamples=resamples, method="percentile",
                  confidence_level=0.95, rng=np.random.default_rng(seed), vectorized=True)
    return r.confidence_interval.low, r.confidence_interval.high


@pytest.mark.parametrize("kind", ["em", "f1", "spread"])
def test_item_intervals_equal_scipy(kind):
    rng = np.random.default_rng(3)
    values = {"em": rng.integers(0, 2, 60) * 100.0, "f1": rng.uniform(0, 100, 60),
              "spread": rng.normal(50, 20, 200)}[kind]
    ours = interval(values, seed=11)
    theirs = _scipy(values, 11)
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert ours[0] < values.mean() < ours[1]


def test_cluster_interval_is_wider_when_items_cluster():
    # 20 contexts with 5 questions each, answered alike within a context: the items are not independent
    rng = np.random.default_rng(0)
    per_context = rng.integers(0, 2, 20) * 100.0
    values = np.repeat(per_context, 5)
    clusters = np.repeat(np.arange(20), 5)
    items = interval(values, seed=1)
    grouped = interval(values, clusters, seed=1)
    assert (grouped[1] - grouped[0]) > 1.8 * (items[1] - items[0])
    # with one item per cluster it is the item bootstrap
    assert interval(per_context, list(range(20)), seed=5) == pytest.approx(interval(per_context, seed=5))


def test_paired_difference():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 2, 80) * 100.0
    better = np.where(rng.uniform(size=80) < 0.4, 100.0, base)
    d = paired_difference(base, better, seed=0)
    assert d["difference"] == pytest.approx(better.mean() - base.mean())
    assert d["significant"] and d["ci"][0] > 0
    same = paired_difference(base, base, seed=0)
    assert same["ci"] == [0.0, 0.0] and not same["significant"]
    noise = paired_difference(base, rng.permutation(base), seed=0)
    assert noise["ci"][0] < 0 < noise["ci"][1]
    with pytest.raises(ValueError):
        paired_difference(base, base[:10])
    assert interval([50.0]) is None and fmt(71.666, [60.0, 83.3]) == "71.67 [60.00, 83.30]"


def test_ratio_interval_is_the_token_weighted_mean_over_units():
    from glotkit.eval.uncertainty import ratio_interval

    rng = np.random.default_rng(4)
    counts = rng.integers(5, 40, 50).astype(float)
    sums = counts * rng.uniform(1.0, 3.0, 50)
    lo, hi = ratio_interval(sums, counts, seed=2)
    assert lo < sums.sum() / counts.sum() < hi
    # equal weights: the interval of the plain mean
    assert ratio_interval(sums / counts, np.ones(50), seed=2) == pytest.approx(interval(sums / counts, seed=2))


def test_sweep_compares_each_trial_with_the_best_on_the_same_items(tmp_path):
    from types import SimpleNamespace

    from glotkit.sweep import _paired_against_best, _write_tables

    rng = np.random.default_rng(0)
    base = (rng.uniform(size=120) < 0.5) * 100.0
    scores = {"a": base, "b": np.where(rng.uniform(size=120) < 0.5, 100.0, base), "c": base.copy()}
    scores["c"][:3] = 100 - scores["c"][:3]  # differs from a on 3 items only: noise

    class System:
        def folder_type(self, d):
            return d

        def item_scores(self, folder):
            return {"ids": list(range(120)), "clusters": [i // 4 for i in range(120)], "scores": {"f1": list(scores[folder])}}

    trials = [(n, {"lora.r": i}, SimpleNamespace(run_dir=lambda n=n: n)) for i, n in enumerate(scores)]
    rows = [{"trial": n, "lora.r": i, "status": "ok", "f1": float(scores[n].mean())} for i, n in enumerate(scores)]
    assert _paired_against_best(System(), trials, rows) == "f1"
    best = max(rows, key=lambda r: r["f1"])
    assert best["vs_best_f1"]["difference"] == 0.0 and not best["vs_best_f1"]["significant"]
    for r in rows:
        want = paired_difference(scores[best["trial"]], scores[r["trial"]], [i // 4 for i in range(120)])
        assert r["vs_best_f1"] == want
    _write_tables(tmp_path, ["lora.r"], rows)
    assert "vs_best_f1" in (tmp_path / "sweep.md").read_text()
