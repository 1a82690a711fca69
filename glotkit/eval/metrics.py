"""Metrics of the task suite, computed by the field's reference libraries.

Classification (accuracy, macro-F1 over the task's full label set, so that a class the model never
predicts still counts), regression (Pearson and Spearman from SciPy), multiple choice with one or
more correct options (exact set match and per-option F1), and ROUGE-1/2/L from ``rouge-score``
with a tokenizer that keeps letters of every script: its default tokenizer keeps only ``[a-z0-9]``
and so would cut "școală" into "coal".
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable, Mapping, Sequence

import numpy as np

from glotkit.data.text import fix_romanian_diacritics


def classification_scores(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (%) over ``labels``; an unparsable prediction is simply wrong."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": round(100 * accuracy_score(golds, preds), 2),
        "macro_f1": round(100 * f1_score(golds, preds, labels=list(labels), average="macro", zero_division=0), 2),
        "n": len(golds),
    }


def correlation_scores(preds: Sequence[float | None], golds: Sequence[float], missing: float = 0.0) -> dict[str, float]:
    """Pearson and Spearman (×100); an unparsable prediction counts as ``missing``."""
    from scipy.stats import pearsonr, spearmanr

    x = [missing if p is None else float(p) for p in preds]
    y = [float(g) for g in golds]
    constant = len(set(x)) < 2
    return {
        "pearson": 0.0 if constant else round(100 * float(pearsonr(x, y)[0]), 2),
        "spearman": 0.0 if constant else round(100 * float(spearmanr(x, y)[0]), 2),
        "unparsed": sum(p is None for p in preds),
        "n": len(golds),
    }


def option_set_scores(preds: Sequence[set[str]], golds: Sequence[set[str]], options: Sequence[str]) -> dict[str, float]:
    """Multiple choice with one or more correct options: exact set match and micro per-option F1 (%)."""
    exact = sum(p == g for p, g in zip(preds, golds))
    tp = sum(len(p & g) for p, g in zip(preds, golds))
    fp = sum(len(p - g) for p, g in zip(preds, golds))
    fn = sum(len(g - p) for p, g in zip(preds, golds))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"exact_set_match": round(100 * exact / max(len(golds), 1), 2), "option_f1": round(100 * f1, 2),
            "n": len(golds)}


class UnicodeTokenizer:
    """For rouge-score: NFC, Romanian cedilla fixed, case folded, runs of letters/digits as tokens."""

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        text = fix_romanian_diacritics(unicodedata.normalize("NFC", text)).casefold()
        return [t for t in self._word.findall(text) if t != "_"]


def rouge_items(preds: Sequence[str], refs: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measure (%) of each summary, with :class:`UnicodeTokenizer`."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=UnicodeTokenizer())
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)
        for k in out:
            out[k].append(100 * s[k].fmeasure)
    return out


def rouge_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (%) with :class:`UnicodeTokenizer`."""
    items = rouge_items(preds, refs)
    n = max(len(refs), 1)
    return {k: round(sum(v) / n, 2) for k, v in items.items()} | {"n": len(refs)}


# Item-level forms of the metrics above, for the bootstrap (glotkit.eval.uncertainty): each returns a
# function of an index array giving the metrics on those items (resampled items may repeat).  They
# compute the same numbers as the reference functions (tests/test_suite_metrics.py compares them on
# resamples); they exist because recomputing scikit-learn's F1 or ROUGE 1,000 times is slow.
Statistic = Callable[[np.ndarray], Mapping[str, float]]


def mean_statistic(columns: Mapping[str, Sequence[float]]) -> Statistic:
    """Metrics that are means of per-item scores (accuracy, EM/F1, ROUGE)."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in columns.items()}
    return lambda idx: {k: float(a[idx].mean()) for k, a in arrays.items()}


def classification_statistic(preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]) -> Statistic:
    """Accuracy and macro-F1 over ``labels`` (a label absent from golds and predictions scores 0,
    scikit-learn's ``zero_division=0``), as :func:`classification_scores`."""
    code = {label: i for i, label in enumerate(labels)}
    p = np.array([code.get(x, -1) if x is not None else -1 for x in preds])
    g = np.array([code.get(x, -2) for x in golds])
    k = len(labels)

    def stat(idx):
        pi, gi = p[idx], g[idx]
        hit = pi == gi
        tp = np.bincount(gi[hit & (gi >= 0)], minlength=k)[:k]
        n_pred = np.bincount(pi[pi >= 0], minlength=k)[:k]
        n_gold = np.bincount(gi[gi >= 0], minlength=k)[:k]
        den = n_pred + n_gold
        f1 = np.divide(2 * tp, den, out=np.zeros(k), where=den > 0)
        return {"accuracy": 100 * float(hit.mean()), "macro_f1": 100 * float(f1.mean())}

    return stat


def correlation_statistic(preds: Sequence[float | None], golds: Sequence[float], missing: float = 0.0) -> Statistic:
    """Pearson and Spearman ×100 (0 when the predictions are constant), as :func:`correlation_scores`."""
    from scipy.stats import rankdata

    x = np.array([missing if v is None else float(v) for v in preds])
    y = np.array([float(v) for v in golds])

    def corr(a, b):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return 0.0 if np.ptp(a) == 0 else float("nan")
        return 100 * float(np.corrcoef(a, b)[0, 1])

    def stat(idx):
        a, b = x[idx], y[idx]
        return {"pearson": corr(a, b), "spearman": corr(rankdata(a), rankdata(b))}

    return stat


def option_set_statistic(preds: Sequence[set[str]], golds: Sequence[set[str]]) -> Statistic:
    """Exact set match and micro per-option F1, as :func:`option_set_scores`."""
    exact = np.array([p == g for p, g in zip(preds, golds)], dtype=float)
    tp = np.array([len(p & g) for p, g in zip(preds, golds)], dtype=float)
    errors = np.array([len(p - g) + len(g - p) for p, g in zip(preds, golds)], dtype=float)

    def stat(idx):
        t, e = tp[idx].sum(), errors[idx].sum()
        return {"exact_set_match": 100 * float(exact[idx].mean()), "option_f1": 100 * t * 2 / (2 * t + e) if t else 0.0}

    return stat
