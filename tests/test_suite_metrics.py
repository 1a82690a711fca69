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
