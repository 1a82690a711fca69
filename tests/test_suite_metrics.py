"""Task-suite metrics against the reference libraries on the same inputs."""

from __future__ import annotations

import random

from glotkit.eval.metrics import UnicodeTokenizer, classification_scores, correlation_scores, option_set_scores, rouge_scores


def test_classification_against_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    labels = ["pozitiv", "negativ", "neutru", "contradicție"]
    golds = [rng.choice(labels) for _ in range(200)]
    preds = [g if rng.random() < 0.6 else rng.choice(labels[:3] + ["???"]) for g in golds]
    s = classification_scores(preds, golds, labels)
    assert s["accuracy"] == round(100 * accuracy_score(golds, preds), 2)
    assert s["macro_f1"] == round(100 * f1_score(golds, preds, labels=labels, average="macro", zero_division=0), 2)
    # a label never predicted still pulls macro-F1 down
    assert classification_scores(["a", "a"], ["a", "b"], ["a", "b"])["macro_f1"] == round(100 * (2 / 3) / 2, 2)


def test_correlations_against_scipy():
    from scipy.stats import pearsonr, spearmanr

    rng = random.Random(1)
    golds = [rng.uniform(0, 5) for _ in range(100)]
    preds = [g + rng.gauss(0, 1) for g in golds]
    s = correlation_scores(preds, golds)
    assert s["pearson"] == round(100 * pearsonr(preds, golds)[0], 2)
    assert s["spearman"] == round(100 * spearmanr(preds, golds)[0], 2)
    s = correlation_scores([None] + preds[1:], golds)
    assert s["unparsed"] == 1
    assert correlation_scores([2.0] * 5, [1, 2, 3, 4, 5])["pearson"] == 0.0  # constant: no correlation, no NaN


def test_option_sets():
    s = option_set_scores([{"A"}, {"A", "B"}, {"C"}], [{"A"}, {"A", "C"}, {"B"}], ["A", "B", "C"])
    assert s["exact_set_match"] == round(100 / 3, 2)
    tp, fp, fn = 2, 2, 2
    assert s["option_f1"] == round(100 * 2 * tp / (2 * tp + fp + fn), 2)


def test_rouge_equals_rouge_score_on_english_and_keeps_romanian_letters():
    from rouge_score import rouge_scorer

    pairs = [("the cat sat on the mat", "a cat sat on a mat"), ("Hello world", "hello there world")]
    default = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    ours = rouge_scores([p for p, _ in pairs], [r for _, r in pairs])
    for k in ("rouge1", "rouge2", "rougeL"):
        ref = sum(default.score(r, p)[k].fmeasure for p, r in pairs) / len(pairs)
        assert ours[k] == round(100 * ref, 2)
    # the default tokenizer drops ș, ț, ă, â, î: "școală" and "coal" would look alike
    assert default.score("școală", "coal")["rouge1"].fmeasure == 1.0
    assert rouge_scores(["coal"], ["școală"])["rouge1"] == 0.0
    assert rouge_scores(["Şcoală"], ["școală"])["rouge1"] == 100.0  # cedilla and case forgiven
    assert UnicodeTokenizer().tokenize("Țara mea, 1918!") == ["țara", "mea", "1918"]


def test_item_level_metrics_equal_the_references_on_resamples():
    """The bootstrap recomputes each metric on resampled items with fast item-level forms; on every
    resample they give what scikit-learn, SciPy and the set metric give on those items."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score

    from glotkit.eval.metrics import classification_statistic, correlation_statistic, option_set_statistic

    rng = random.Random(2)
    labels = ["a", "b", "c", "d"]
    golds = [rng.choice(labels[:3]) for _ in range(80)]  # "d" never gold
    preds = [g if rng.random() < 0.5 else rng.choice(labels + [None]) for g in golds]
    cls = classification_statistic(preds, golds, labels)
    scores = [rng.uniform(0, 5) for _ in range(80)]
    guesses = [None if i % 17 == 0 else s + rng.gauss(0, 1.5) for i, s in enumerate(scores)]
    cor = correlation_statistic(guesses, scores, missing=2.5)
    sets_g = [set(rng.sample("ABC", rng.randint(1, 2))) for _ in range(80)]
    sets_p = [set(rng.sample("ABC", rng.randint(0, 2))) for _ in range(80)]
    mc = option_set_statistic(sets_p, sets_g)
    draws = np.random.default_rng(0).integers(0, 80, size=(25, 80))
    for idx in draws:
        p, g = [preds[i] for i in idx], [golds[i] for i in idx]
        want = classification_scores([x or "" for x in p], g, labels)
        got = cls(idx)
        assert round(got["accuracy"], 2) == want["accuracy"]
        assert abs(got["macro_f1"] - 100 * f1_score(g, [x or "" for x in p], labels=labels, average="macro",
                                                    zero_division=0)) < 1e-9
        x = [2.5 if guesses[i] is None else guesses[i] for i in idx]
        y = [scores[i] for i in idx]
        assert abs(cor(idx)["pearson"] - 100 * pearsonr(x, y)[0]) < 1e-8
        assert abs(cor(idx)["spearman"] - 100 * spearmanr(x, y)[0]) < 1e-8
        ref = option_set_scores([sets_p[i] for i in idx], [sets_g[i] for i in idx], ["A", "B", "C"])
        assert round(mc(idx)["exact_set_match"], 2) == ref["exact_set_match"]
        assert round(mc(idx)["option_f1"], 2) == ref["option_f1"]


def test_metric_intervals_equal_scipy_bootstrap():
    """Intervals of statistics that are not means (macro-F1, Spearman) are scipy.stats.bootstrap's
    percentile intervals of the same statistic on the same data (paired resampling of items)."""
    import numpy as np
    from scipy.stats import bootstrap, spearmanr
    from sklearn.metrics import f1_score

    from glotkit.eval.metrics import classification_statistic, correlation_statistic
    from glotkit.eval.uncertainty import statistic_intervals

    rng = random.Random(3)
    labels = ["x", "y", "z"]
    golds = [rng.choice(labels) for _ in range(50)]
    preds = [g if rng.random() < 0.6 else rng.choice(labels) for g in golds]
    ours = statistic_intervals(classification_statistic(preds, golds, labels), 50, seed=4, resamples=300)["macro_f1"]
    g_arr, p_arr = np.array(golds), np.array(preds)
    theirs = bootstrap((g_arr, p_arr), lambda g, p: 100 * f1_score(g, p, labels=labels, average="macro", zero_division=0),
                       paired=True, vectorized=False, n_resamples=300, method="percentile",
                       rng=np.random.default_rng(4)).confidence_interval
    assert ours == [float(theirs.low), float(theirs.high)] or np.allclose(ours, [theirs.low, theirs.high], atol=1e-9)
    xs = [rng.uniform(0, 5) for _ in range(40)]
    ys = [x + rng.gauss(0, 1) for x in xs]
    ours = statistic_intervals(correlation_statistic(ys, xs), 40, seed=9, resamples=300)["spearman"]
    theirs = bootstrap((np.array(ys), np.array(xs)), lambda a, b: 100 * spearmanr(a, b)[0], paired=True,
                       vectorized=False, n_resamples=300, method="percentile", rng=np.random.default_rng(9)).confidence_interval
    assert np.allclose(ours, [theirs.low, theirs.high], atol=1e-9)
