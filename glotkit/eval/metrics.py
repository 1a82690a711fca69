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
from typing import Sequence

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


def rouge_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (%) with :class:`UnicodeTokenizer`."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=UnicodeTokenizer())
    tot = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)
        for k in tot:
            tot[k] += s[k].fmeasure
    n = max(len(refs), 1)
    return {k: round(100 * v / n, 2) for k, v in tot.items()} | {"n": len(refs)}
