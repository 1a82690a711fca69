"""Reference answers a model must beat to be said to read the article.

- :func:`all_false_rows`: FALSE/FALSE for every pair (the majority answer; official score 0.4167
  on a file with every label present: 1/3 for ``at``, 1/2 for ``isAt``).
- :class:`SurfaceBaseline`: a logistic regression (scikit-learn) on where the pair is mentioned,
  not on what the article says: the words between the closest person and place mentions, one
  sentence or not, how often and how early each is mentioned, the article's length, the number of
  pairs in the document and its language.  Fit on the training pairs with balanced class weights
  (the official score is a macro recall), one model for ``at`` and one for ``isAt``; a pair gets
  the valid (at, isAt) combination with the highest summed log-probability.

Rows are in the form :func:`glotkit.hipe.predict.score_rows` scores.
"""

from __future__ import annotations

import math
from typing import Sequence

from glotkit.hipe.data import placement
from glotkit.hipe.parse import VALID_LABELS
from glotkit.hipe.predict import pair_key

Item = tuple[dict, dict]  # (document, pair)

ALL_FALSE = "FALSE/FALSE everywhere"  # the names of the references in reports and table.json
SURFACE = "mention positions (logistic regression)"

FEATURES = ("log words between", "same sentence", "log person mentions", "log place mentions",
            "first person mention (share of the text)", "first place mention (share of the text)",
            "log article words", "log pairs in the document")


def _row(doc: dict, pair: dict, at: str, is_at: str) -> dict:
    return {"key": list(pair_key(doc, pair)),
            "language": doc.get("language"), "at": at, "isAt": is_at, "parsed": True, "corrected": False}


def all_false_rows(items: Sequence[Item]) -> list[dict]:
    """FALSE/FALSE for every pair."""
    return [_row(doc, pair, "FALSE", "FALSE") for doc, pair in items]


def surface_features(doc: dict, pair: dict) -> list[float]:
    """The :data:`FEATURES` of one pair (language excluded; :class:`SurfaceBaseline` adds it)."""
    text = doc["text"]
    at = placement(text, pair["pers_mentions_list"], pair["loc_mentions_list"])
    n = max(len(text), 1)
    gap, same = (at.words, 0.0) if at.gap is None else (at.gap, float(at.same_sentence))
    return [math.log1p(gap), same, math.log1p(len(at.persons)), math.log1p(len(at.places)),
            min((s[0] for s in at.persons), default=n) / n, min((s[0] for s in at.places), default=n) / n,
            math.log1p(at.words), math.log1p(len(doc.get("sampled_pairs") or [pair]))]


class SurfaceBaseline:
    """Logistic regressions of ``at`` and ``isAt`` on :func:`surface_features` and the language."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.languages: list[str] = []
        self.models: dict = {}

    def _matrix(self, items: Sequence[Item]):
        import numpy as np

        return np.array([surface_features(d, p) + [float(d.get("language") == x) for x in self.languages]
                         for d, p in items], dtype=float)

    def fit(self, items: Sequence[Item]) -> "SurfaceBaseline":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if not items:
            raise ValueError("the surface baseline needs training pairs")
        self.languages = sorted({d.get("language") or "" for d, _ in items})
        x = self._matrix(items)
        for target in ("at", "isAt"):
            y = [p[target] for _, p in items]
            model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                                       random_state=self.seed))
            self.models[target] = model.fit(x, y) if len(set(y)) > 1 else y[0]
        return self

    def _log_proba(self, target: str, x) -> list[dict[str, float]]:
        model = self.models[target]
        if isinstance(model, str):  # one label only in training
            return [{model: 0.0} for _ in range(len(x))]
        classes = list(model.classes_)
        return [dict(zip(classes, row)) for row in model.predict_log_proba(x)]

    def rows(self, items: Sequence[Item]) -> list[dict]:
        if not items:
            return []
        x = self._matrix(items)
        at, is_at = self._log_proba("at", x), self._log_proba("isAt", x)
        out = []
        for (doc, pair), pa, pi in zip(items, at, is_at):
            best = max(VALID_LABELS, key=lambda ai: pa.get(ai[0], -math.inf) + pi.get(ai[1], -math.inf))
            out.append(_row(doc, pair, *best))
        return out
