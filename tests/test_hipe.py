"""HIPE-2026: the answer parser and the official scores (hand-computed and scikit-learn)."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED
from glotkit.errors import GlotkitError
from glotkit.hipe.parse import first_json_object, parse_answer
from glotkit.hipe.score import pair_labels, profile, score_file


def test_parser_cases():
    p = parse_answer('He lived there. ```json\n{"at": "probable", "isAt": "FALSE",}\n```')
    assert (p.at, p.isAt, p.ok) == ("PROBABLE", "FALSE", True)
    p = parse_answer('Note {"reason": "a } inside {a string}", "at": "TRUE", "isAt": "TRUE"} and {"at": "FALSE"}')
    assert (p.at, p.isAt, p.ok) == ("TRUE", "TRUE", True)
    assert first_json_object('x {"a": "\\" }"} y') == '{"a": "\\" }"}'
    for bad, why in (("no json here", "no JSON"), ('{"at": "MAYBE", "isAt": "TRUE"}', "'at'"),
                     ('{"at": "TRUE"}', "'isAt'"), ("{at: TRUE}", "invalid JSON")):
        p = parse_answer(bad)
        assert (p.at, p.isAt, p.ok) == ("FALSE", "FALSE", False) and why in p.error
    p = parse_answer('{"at": "FALSE", "isAt": "TRUE"}')  # isAt TRUE implies at
    assert (p.at, p.isAt, p.corrected) == ("TRUE", "TRUE", True)
    assert parse_answer('{"AT": true, "isat": false}').at == "TRUE"


def _doc(doc_id, labels):
    return {"document_id": doc_id, "sampled_pairs": [
        {"pers_entity_id": f"p{i}", "loc_entity_id": f"l{i}", "at": a, "isAt": b} for i, (a, b) in enumerate(labels)]}


def test_score_by_hand():
    gold = [_doc("d1", [("TRUE", "TRUE"), ("PROBABLE", "FALSE"), ("FALSE", "FALSE"), ("TRUE", "FALSE")])]
    # pair 3 is missing from the predictions (counts as FALSE/FALSE)
    pred = [_doc("d1", [("TRUE", "TRUE"), ("TRUE", "FALSE"), ("FALSE", "TRUE")])]
    r = score_file(gold, pred)
    # at: TRUE recall 1/2 (pair 3 missing -> FALSE), PROBABLE 0/1, FALSE 1/1 -> (0.5 + 0 + 1) / 3
    assert r["at_macro_recall"] == pytest.approx(0.5, abs=1e-4)
    # isAt: TRUE 1/1, FALSE 2/3 (pair 2 predicted TRUE) -> (1 + 2/3) / 2
    assert r["isAt_macro_recall"] == pytest.approx(5 / 6, abs=1e-4)
    assert r["score"] == pytest.approx((0.5 + 5 / 6) / 2, abs=1e-4) and r["missing_pairs"] == 1
    # binary: PROBABLE -> TRUE: at TRUE recall 2/3, FALSE 1/1
    assert r["binary"]["at_macro_recall"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)
    assert r["confusion"]["at"]["matrix"] == [[1, 0, 1], [1, 0, 0], [0, 0, 1]]
    assert (profile({"de": r, "en": {"score": 1.0, "binary": {"score": 1.0}}})["score"]
            == pytest.approx((r["score"] + 1) / 2, abs=1e-4))
    with pytest.raises(GlotkitError, match="unknown document id 'd9'"):
        score_file(gold, [_doc("d9", [])])


@pytest.mark.integration
def test_score_against_sklearn_on_real_gold():
    import random

    from sklearn.metrics import recall_score

    path = SHARED / "data" / "hipe-2026" / "newspapers" / "HIPE-2026-v1.0-impresso-train-fr.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared/data is needed)")
    gold = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    pred = json.loads(json.dumps(gold))
    for d in pred:
        for p in d["sampled_pairs"]:
            p["at"], p["isAt"] = rng.choice(["TRUE", "PROBABLE", "FALSE"]), rng.choice(["TRUE", "FALSE"])
    r = score_file(gold, pred)
    g, q = pair_labels(gold), pair_labels(pred)
    keys = sorted(g)
    at = recall_score([g[k][0] for k in keys], [q[k][0] for k in keys], average="macro")
    is_at = recall_score([g[k][1] for k in keys], [q[k][1] for k in keys], average="macro")
    assert r["score"] == pytest.approx((at + is_at) / 2, abs=1e-4) and r["pairs"] == len(keys) > 50
    assert score_file(gold, gold)["score"] == 1.0


def _hipe_line(**over):
    doc = {"document_id": "d1", "media": {"publication_title": "T", "time_period": "1900", "source_type": "Newspaper"},
           "source": "s", "date": "1900-01-02", "language": "en", "text": "Smith went to Bern.",
           "sampled_pairs": [{"pers_entity_id": "p", "pers_wikidata_QID": None, "pers_mentions_list": ["Smith"],
                              "loc_entity_id": "l", "loc_wikidata_QID": None, "loc_mentions_list": ["Bern"],
                              "at": "TRUE", "isAt": "FALSE"}]}
    doc.update(over)
    return doc


@pytest.mark.integration
def test_reader_validates_against_the_schema(tmp_path):
    from glotkit.hipe.data import default_schema, read_hipe

    if default_schema() is None:
        pytest.skip("the HIPE schema in ../shared/data is not present")
    f = tmp_path / "x.jsonl"
    good = _hipe_line()
    bad = _hipe_line()
    bad["sampled_pairs"][0]["at"] = "MAYBE"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(GlotkitError, match=r"x.jsonl: line 2: sampled_pairs\[0\].at: 'MAYBE' is not one of"):
        read_hipe(f)
    empty = _hipe_line()
    empty["sampled_pairs"][0]["loc_mentions_list"] = []
    f.write_text(json.dumps(empty) + "\n", encoding="utf-8")
    with pytest.raises(GlotkitError, match=r"line 1: sampled_pairs\[0\].loc_mentions_list: empty"):
        read_hipe(f)
    for lang in ("de", "en", "fr"):
        docs = read_hipe(SHARED / "data" / "hipe-2026" / "newspapers" / f"HIPE-2026-v1.0-impresso-train-{lang}.jsonl")
        assert len(docs) >= 30


def test_predictions_file_keeps_ids_and_order(tmp_path):
    from glotkit.hipe.data import split_by_document, write_predictions

    gold = [_hipe_line(document_id=f"d{i}") for i in range(10)]
    write_predictions(tmp_path / "p.jsonl", gold, {("d3", "p", "l"): ("PROBABLE", "TRUE")})
    pred = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [d["document_id"] for d in pred] == [d["document_id"] for d in gold]
    assert pred[3]["sampled_pairs"][0]["at"] == "PROBABLE" and pred[0]["sampled_pairs"][0]["at"] == "FALSE"
    assert score_file(gold, gold)["pairs"] == 10
    a, b = split_by_document(gold, 0.3, seed=1)
    assert len(b) == 3 and not {d["document_id"] for d in a} & {d["document_id"] for d in b}
    assert (a, b) == split_by_document(gold, 0.3, seed=1)


def test_excerpt_keeps_the_mentions():
    from glotkit.hipe.data import excerpt
    from glotkit.hipe.formats import question

    text = "word " * 400 + "Smith arrived in Bern yesterday. " + "word " * 400
    ex = excerpt(text, ["Smith", "Bern"], 300)
    assert "Smith arrived in Bern" in ex and ex.startswith("… ") and ex.endswith(" …") and len(ex) <= 310
    assert excerpt("short", ["x"], 300) == "short"
    p = question(_hipe_line(), _hipe_line()["sampled_pairs"][0], "explain-json", 2000)
    assert "published 1900-01-02" in p and "Person: Smith" in p and "Place: Bern" in p and '"isAt"' in p
