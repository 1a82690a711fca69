"""Exact match and token F1 for extractive QA, raw and normalized, max over gold answers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from glotkit.eval.normalize import normalize_answer, raw_answer


def extract_answer(generation: str, marker: str | None = "Answer:") -> str:
    """The answer in a generation: text after the answer marker (if the model wrote one again),
    leading blank lines skipped, up to the first newline."""
    text = generation
    if marker and marker in text:
        text = text.split(marker, 1)[1]
    text = text.lstrip()
    return text.split("\n", 1)[0].strip()


def _f1_tokens(pred: list[str], gold: list[str]) -> float:
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str, language: str = "ro", normalized: bool = True) -> float:
    if normalized:
        return float(normalize_answer(prediction, language) == normalize_answer(gold, language))
    return float(raw_answer(prediction) == raw_answer(gold))


def token_f1(prediction: str, gold: str, language: str = "ro", normalized: bool = True) -> float:
    if normalized:
        return _f1_tokens(normalize_answer(prediction, language).split(), normalize_answer(gold, language).split())
    return _f1_tokens(raw_answer(prediction).split(), raw_answer(gold).split())


@dataclass
class QAScore:
    em: float
    f1: float
    em_raw: float
    f1_raw: float


def score_one(prediction: str, golds: Sequence[str], language: str = "ro") -> QAScore:
    """Max over the gold answers, as the official SQuAD script does."""
    return QAScore(
        em=max(exact_match(prediction, g, language) for g in golds),
        f1=max(token_f1(prediction, g, language) for g in golds),
        em_raw=max(exact_match(prediction, g, language, normalized=False) for g in golds),
        f1_raw=max(token_f1(prediction, g, language, normalized=False) for g in golds),
    )


def aggregate(scores: Sequence[QAScore]) -> dict[str, float]:
    """Percentages (0–100) like the official script, plus the count."""
    n = len(scores)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "em_raw": 0.0, "f1_raw": 0.0, "n": 0}
    return {
        "em": round(100 * sum(s.em for s in scores) / n, 2),
        "f1": round(100 * sum(s.f1 for s in scores) / n, 2),
        "em_raw": round(100 * sum(s.em_raw for s in scores) / n, 2),
        "f1_raw": round(100 * sum(s.f1_raw for s in scores) / n, 2),
        "n": n,
    }
