"""QA metrics: parity with the official SQuAD v1.1 script, and the language-aware parts."""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter

import pytest

from conftest import SHARED
from glotkit.eval.normalize import normalize_answer
from glotkit.eval.qa_metrics import aggregate, exact_match, extract_answer, score_one, token_f1


# ---- the official SQuAD v1.1 evaluation functions (evaluate-v1.1.py), verbatim in behaviour
def _official_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(prediction, ground_truth):
    p = _official_normalize(prediction).split()
    g = _official_normalize(ground_truth).split()
    common = Counter(p) & Counter(g)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(p)
    recall = 1.0 * num_same / len(g)
    return (2 * precision * recall) / (precision + recall)


def _official_em(prediction, ground_truth):
    return _official_normalize(prediction) == _official_normalize(ground_truth)


def _official_evaluate(golds, preds):
    em = f1 = 0.0
    for g, p in zip(golds, preds):
        em += max(_official_em(p, x) for x in g)
        f1 += max(_official_f1(p, x) for x in g)
    return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f1 / len(golds)}


HAND_CASES = [
    ("the Eiffel Tower", ["Eiffel Tower"]),
    ("An apple a day", ["apple day", "an apple"]),
    ("Denver Broncos.", ["Denver Broncos"]),
    ("  1,000 people ", ["1000 people"]),
    ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"]),
    ("", ["something"]),
    ("the the the", ["the"]),
    ("theatre", ["the atre"]),
    ("Beyonce's album (2003)", ["album 2003", "Dangerously in Love"]),
    ("a-b c_d", ["ab cd"]),
]


def _english_cases():
    cases = list(HAND_CASES)
    path = SHARED / "data" / "xquad" / "xquad.en.dev.json"
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        golds = [[a["text"] for a in qa["answers"]] for art in doc["data"] for p in art["paragraphs"] for qa in p["qas"]]
        rng = random.Random(0)
        for g in golds[:400]:
            a = g[0]
            choice = rng.randrange(4)
            pred = ("The " + a + ".") if choice == 0 else (a.split()[0] if choice == 1 else
                    (rng.choice(golds)[0] if choice == 2 else a.upper() + " (approx.)"))
            cases.append((pred, g))
    return [(p, g) for p, g in cases if all(c.isascii() for c in p + "".join(g))]


def test_equal_to_official_squad_v11_on_english():
    cases = _english_cases()
    assert len(cases) >= 10
    for pred, golds in cases:
        ours = score_one(pred, golds, language="en")
        assert ours.em == float(max(_official_em(pred, g) for g in golds)), (pred, golds)
        assert ours.f1 == pytest.approx(max(_official_f1(pred, g) for g in golds), abs=1e-12), (pred, golds)
    official = _official_evaluate([g for _, g in cases], [p for p, _ in cases])
    agg = aggregate([score_one(p, g, language="en") for p, g in cases])
    assert agg["em"] == round(official["exact_match"], 2)
    assert agg["f1"] == round(official["f1"], 2)


def test_normalize_matches_official_on_ascii_english():
    for s in ["The Quick, brown fox!", "an  A  the", "U.S.A. (1999)", "it's a test-case"]:
        assert normalize_answer(s, "en") == _official_normalize(s)


def test_romanian_cedilla_matches_only_after_normalization():
    comma, cedilla = "Pleșuv", "Pleşuv"
    assert comma != cedilla
    assert exact_match(cedilla, comma, "ro") == 1.0
    assert exact_match(cedilla, comma, "ro", normalized=False) == 0.0
    assert token_f1("Vârful Pleşuv", "vârful Pleșuv", "ro") == 1.0
    assert token_f1("Vârful Pleşuv", "vârful Pleșuv", "ro", normalized=False) == 0.0
    assert normalize_answer("ŢARA ŞI ţara", "ro") == "țara și țara"


def test_cedilla_kept_for_turkish_and_articles_only_for_english():
    assert normalize_answer("Şişli", "tr") == "şişli"
    assert normalize_answer("a casa", "ro") == "a casa"  # Romanian 'a' is a word, not an article
    assert normalize_answer("a house", "en") == "house"


def test_unicode_punctuation_removed():
    assert normalize_answer("„Luceafărul” — 1883…", "ro") == "luceafărul 1883"
    assert normalize_answer("«Ion»", "ro") == "ion"
    # NFC: decomposed ă equals composed ă
    assert exact_match("Brăila", "Bra\u0306ila", "ro") == 1.0


def test_extraction():
    assert extract_answer(" București\nQuestion: x") == "București"
    assert extract_answer("\n\n  Cibin river\n") == "Cibin river"
    assert extract_answer(" x\nAnswer: y", marker="Answer:") == "y"
    assert extract_answer("Răspuns: 1850\n", marker="Răspuns:") == "1850"
    assert extract_answer("") == ""


def test_aggregate_percentages():
    s = [score_one("a b", ["a b"]), score_one("a", ["a b"])]
    agg = aggregate(s)
    assert agg["n"] == 2 and agg["em"] == 50.0
    assert agg["f1"] == round(100 * (1 + 2 / 3) / 2, 2)
