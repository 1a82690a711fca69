"""HIPE-2026: the answer parser and the official scores (hand-computed and scikit-learn)."""

from __future__ import annotations

import json
import random

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


def test_marked_excerpt_centres_on_the_closest_mentions_and_marks_them():
    from glotkit.hipe.data import marked_excerpt
    from glotkit.hipe.formats import DEFINITIONS, question

    pad = "word " * 200
    text = f"Smith was born far away. {pad}Bern is a city. {pad}Then Smith arrived in Bern yesterday. {pad}"
    ex = marked_excerpt(text, ["Smith"], ["Bern"], 200)
    assert "Then <person>Smith</person> arrived in <place>Bern</place> yesterday." in ex  # the closest pair
    assert "born" not in ex and ex.startswith("… ") and ex.endswith(" …")
    assert len(ex.replace("<person>", "").replace("</person>", "").replace("<place>", "").replace("</place>", "")) <= 204
    # farther apart than the excerpt: a stretch around each, joined by "…"
    far = f"{pad}Smith spoke. {pad}{pad}Bern was quiet. {pad}"
    ex = marked_excerpt(far, ["Smith"], ["Bern"], 200)
    assert ex.count("<person>Smith</person>") == 1 and ex.count("<place>Bern</place>") == 1
    assert ex.index("<person>") < ex.index(" … ") < ex.index("<place>")
    # a mention inside a longer one is marked once (the longer wins); short text is shown whole
    assert marked_excerpt("Mr Bern Smith met in Bern.", ["Bern Smith"], ["Bern"], 500) == \
        "Mr <person>Bern Smith</person> met in <place>Bern</place>."
    assert marked_excerpt("nothing here", ["Smith"], ["Bern"], 500) == "nothing here"
    line = _hipe_line()
    q = question(line, line["sampled_pairs"][0], "json", 2000, layout="marked")
    assert q.startswith(DEFINITIONS) and q.endswith("Person: Smith\nPlace: Bern")  # the same start for every pair



def test_mention_facts_count_the_whole_article_and_measure_the_closest_gap():
    from glotkit.hipe.data import mention_facts
    from glotkit.hipe.formats import question

    pad = "word " * 300
    text = f"Smith was born far away. {pad}Smith went to Bern. {pad}The Bern council met."
    facts = mention_facts(text, ["Smith"], ["Bern"])
    assert facts == (f"The article has {len(text.split())} words; the person is mentioned 2 times, the place "
                     "2 times; their closest mentions are 2 words apart, in the same sentence.")
    assert mention_facts("Smith stayed home. Later, Bern.", ["Smith"], ["Bern"]).endswith(
        "3 words apart, in different sentences.")
    assert mention_facts("Smith alone.", ["Smith"], ["Bern"]) == \
        "The article has 2 words; the person is mentioned once, the place nowhere in the text."
    line = _hipe_line()
    marked = question(line, line["sampled_pairs"][0], "json", 2000, layout="marked")
    with_facts = question(line, line["sampled_pairs"][0], "json", 2000, layout="facts")
    # the facts sentence sits between the excerpt and the pair; the rest is the marked prompt
    head, pair = marked.rsplit("\n\nPerson:", 1)
    assert with_facts.startswith(head + "\n\nThe article has ") and with_facts.endswith("\n\nPerson:" + pair)


def test_the_surface_baseline_learns_where_the_pair_is_mentioned():
    from glotkit.hipe.baseline import SurfaceBaseline, all_false_rows
    from glotkit.hipe.predict import score_rows

    def doc(i, near):  # near: the person at the place in one sentence (TRUE/TRUE); else far apart (FALSE/FALSE)
        pad = "word " * (5 + i % 7)
        text = (f"Smith{i} arrived in Bern{i} yesterday. {pad}" if near else
                f"Smith{i} spoke. {pad * 20}The city of Bern{i} was quiet. {pad}")
        label = ("TRUE", "TRUE") if near else ("FALSE", "FALSE")
        return {"document_id": f"d{i}", "language": "en" if i % 2 else "de", "text": text,
                "sampled_pairs": [{"pers_entity_id": f"p{i}", "loc_entity_id": f"l{i}", "pers_mentions_list": [f"Smith{i}"],
                                   "loc_mentions_list": [f"Bern{i}"], "at": label[0], "isAt": label[1]}]}

    docs = [doc(i, i % 3 == 0) for i in range(60)]
    items = [(d, p) for d in docs for p in d["sampled_pairs"]]
    train, test = items[:40], items[40:]
    rows = SurfaceBaseline(seed=1).fit(train).rows(test)
    assert [(r["at"], r["isAt"]) for r in rows] == [(p["at"], p["isAt"]) for _, p in test]
    gold = {"de": [d for d in docs[40:] if d["language"] == "de"], "en": [d for d in docs[40:] if d["language"] == "en"]}
    assert score_rows(gold, rows, resamples=0)["profile"]["score"] > \
        score_rows(gold, all_false_rows(test), resamples=0)["profile"]["score"]
    # one label only in training: it is the answer, and the combination stays valid
    only_ff = [it for it in train if it[1]["at"] == "FALSE"]
    assert {(r["at"], r["isAt"]) for r in SurfaceBaseline().fit(only_ff).rows(test)} == {("FALSE", "FALSE")}

# ----------------------------------------------------------------- official targets, precision, intervals


def _full_doc(doc_id, labels, source_type="Newspaper", language="en"):
    """A schema-valid document whose pairs carry ``labels`` [(at, isAt), ...]."""
    doc = _hipe_line(document_id=doc_id, language=language,
                     media={"publication_title": "T", "time_period": "1900", "source_type": source_type})
    pair = doc["sampled_pairs"][0]
    doc["sampled_pairs"] = [dict(pair, pers_entity_id=f"{doc_id}-p{i}", loc_entity_id=f"{doc_id}-l{i}", at=a, isAt=b)
                            for i, (a, b) in enumerate(labels)]
    return doc


def _random_docs(rng, n_docs, pairs=8, source_type="Newspaper", language="en", noise=0.5):
    """(gold, predictions): random gold labels; each predicted label is gold, or with ``noise`` random."""
    gold, pred = [], []
    for i in range(n_docs):
        g = [(rng.choice(["TRUE", "PROBABLE", "FALSE", "FALSE"]), rng.choice(["TRUE", "FALSE", "FALSE"]))
             for _ in range(pairs)]
        p = [(rng.choice(["TRUE", "PROBABLE", "FALSE"]) if rng.random() < noise else a,
              rng.choice(["TRUE", "FALSE"]) if rng.random() < noise else b) for a, b in g]
        gold.append(_full_doc(f"d{i}", g, source_type, language))
        pred.append(_full_doc(f"d{i}", p, source_type, language))
    return gold, pred


def test_literary_works_are_scored_on_at_alone():
    from glotkit.hipe.score import targets_for

    labels = [("TRUE", "FALSE"), ("PROBABLE", "FALSE"), ("FALSE", "FALSE"), ("FALSE", "FALSE")]
    guess = [("TRUE", "TRUE"), ("FALSE", "FALSE"), ("FALSE", "FALSE"), ("TRUE", "FALSE")]
    gold = [_full_doc("v1", labels, "Literary text", "fr")]
    pred = [_full_doc("v1", guess, "Literary text", "fr")]
    assert targets_for(gold) == (("at",), "literary works (media.source_type)")
    r = score_file(gold, pred)
    at = (1 + 0 + 1 / 2) / 3  # TRUE 1/1, PROBABLE 0/1, FALSE 1/2
    assert r["targets"] == ["at"] and r["isAt_macro_recall"] is None and "isAt" not in r["confusion"]
    assert r["at_macro_recall"] == pytest.approx(at, abs=1e-12) and r["score"] == r["at_macro_recall"]
    assert r["binary"]["score"] == r["binary"]["at_macro_recall"] == pytest.approx((1 / 2 + 1 / 2) / 2, abs=1e-12)
    # scored on both, the all-FALSE gold isAt would count (that is why the campaign leaves it out)
    both = score_file(gold, pred, targets="at,isAt")
    assert both["isAt_macro_recall"] == pytest.approx(3 / 4 / 2) and both["score"] == pytest.approx((at + 3 / 8) / 2)
    # the campaign's file names decide first: 'surprise' is at alone, 'impresso' both
    news = [_full_doc("n1", labels)]
    assert targets_for(news)[0] == ("at", "isAt")
    assert targets_for(news, "x/HIPE-2026-v1.0-surprise-test_masked-fr.jsonl")[0] == ("at",)
    assert targets_for(gold, "HIPE-2026-v1.0-impresso-test-fr.jsonl")[0] == ("at", "isAt")
    assert score_file(news, news, name="HIPE-2026-v1.0-surprise-test-fr.jsonl")["targets"] == ["at"]
    with pytest.raises(GlotkitError, match="1 of 2 documents are literary works"):
        targets_for(gold + news)
    with pytest.raises(GlotkitError, match="targets at,where: give at or at,isAt"):
        score_file(gold, pred, targets="at,where")
    # the profile averages the file scores as defined: a literary file contributes its at recall
    p = profile({"fr-lit": r, "en": score_file(news, news)})
    assert p["score"] == pytest.approx((at + 1) / 2, abs=1e-12)


def test_scores_keep_full_precision_and_equal_sklearn_on_random_labels():
    import random

    from sklearn.metrics import recall_score

    gold = [_doc("d1", [("TRUE", "TRUE"), ("PROBABLE", "FALSE"), ("FALSE", "FALSE"), ("TRUE", "FALSE")])]
    r = score_file(gold, [_doc("d1", [("TRUE", "TRUE"), ("TRUE", "FALSE"), ("FALSE", "TRUE")])])
    assert r["isAt_macro_recall"] == pytest.approx(5 / 6, abs=1e-12) != round(5 / 6, 4)  # not rounded
    rng = random.Random(3)
    for trial in range(60):
        n = rng.randint(1, 30)
        at_classes = rng.choice([["TRUE", "PROBABLE", "FALSE"], ["TRUE", "FALSE"], ["FALSE"], ["PROBABLE", "FALSE"]])
        g = [(rng.choice(at_classes), rng.choice(["TRUE", "FALSE"])) for _ in range(n)]
        p = [(rng.choice(["TRUE", "PROBABLE", "FALSE", "MAYBE"][: rng.randint(1, 4)]), rng.choice(["TRUE", "FALSE"]))
             for _ in range(n)]
        keep = [i for i in range(n) if rng.random() > 0.1]  # some pairs missing: FALSE/FALSE
        gold, pred = [_doc("d", g)], [_doc("d", [])]
        pred[0]["sampled_pairs"] = [dict(_doc("d", p)["sampled_pairs"][i]) for i in keep]
        full = [p[i] if i in keep else ("FALSE", "FALSE") for i in range(n)]
        r = score_file(gold, pred, targets="at,isAt")
        at = recall_score([x[0] for x in g], [x[0] for x in full], average="macro", zero_division=0)
        is_at = recall_score([x[1] for x in g], [x[1] for x in full], average="macro", zero_division=0)
        b = {"PROBABLE": "TRUE"}
        at_bin = recall_score([b.get(x[0], x[0]) for x in g], [b.get(x[0], x[0]) for x in full], average="macro",
                              zero_division=0)
        assert r["at_macro_recall"] == pytest.approx(at, abs=1e-12), trial
        assert r["isAt_macro_recall"] == pytest.approx(is_at, abs=1e-12), trial
        assert r["score"] == pytest.approx((at + is_at) / 2, abs=1e-12)
        assert r["binary"]["at_macro_recall"] == pytest.approx(at_bin, abs=1e-12), trial
        assert r["missing_pairs"] == n - len(keep)


def test_bootstrap_intervals_are_seeded_contain_the_score_and_narrow_with_more_documents():
    import random

    from glotkit.hipe.score import bootstrap_intervals

    rng = random.Random(0)
    small = _random_docs(rng, 12)
    large = _random_docs(rng, 300)
    lit = _random_docs(rng, 20, source_type="Literary text", language="fr")
    gold = {"en": small[0], "fr": lit[0]}
    pred = {"en": small[1], "fr": lit[1]}
    ci = bootstrap_intervals(gold, pred, resamples=400, seed=5)
    assert ci == bootstrap_intervals(gold, pred, resamples=400, seed=5)  # seeded
    assert ci != bootstrap_intervals(gold, pred, resamples=400, seed=6)
    assert (ci["level"], ci["resamples"], ci["seed"]) == (0.95, 400, 5)
    per = {k: score_file(gold[k], pred[k]) for k in gold}
    for k, r in per.items():
        for key in ("at_macro_recall", "score"):
            lo, hi = ci["files"][k][key]
            assert lo <= r[key] <= hi and lo < hi, (k, key)
        lo, hi = ci["files"][k]["binary"]["score"]
        assert lo <= r["binary"]["score"] <= hi
    assert ci["files"]["fr"]["isAt_macro_recall"] is None and ci["files"]["fr"]["score"] == ci["files"]["fr"]["at_macro_recall"]
    lo, hi = ci["profile"]["score"]
    assert lo <= profile(per)["score"] <= hi
    # a file's interval does not depend on the other files scored with it
    assert bootstrap_intervals({"en": gold["en"]}, {"en": pred["en"]}, resamples=400, seed=5)["files"]["en"] == ci["files"]["en"]
    wide = ci["files"]["en"]["score"]
    narrow = bootstrap_intervals({"en": large[0]}, {"en": large[1]}, resamples=400, seed=5)["files"]["en"]["score"]
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2
    assert bootstrap_intervals(gold, gold, resamples=50)["files"]["en"]["score"] == [1.0, 1.0]


def test_score_rows_carry_intervals_for_the_tables():
    import random

    from glotkit.hipe.predict import score_rows
    from glotkit.systems.distill import compare_table, efficiency_table

    gold, pred = _random_docs(random.Random(1), 10)
    rows = [{"key": [d["document_id"], p["pers_entity_id"], p["loc_entity_id"]], "at": p["at"], "isAt": p["isAt"],
             "parsed": True, "corrected": False} for d in pred for p in d["sampled_pairs"]]
    r = score_rows({"en": gold}, rows, resamples=200)
    lo, hi = r["languages"]["en"]["ci"]["score"]
    assert lo <= r["languages"]["en"]["score"] <= hi and r["profile"]["ci"]["resamples"] == 200
    row = r | {"model": "m", "format": "json", "timing": {"seconds": 1.0, "pairs": 80}}
    s = f"{r['profile']['score'] * 100:.2f} [{lo * 100:.1f}, {hi * 100:.1f}]"
    assert f"| m | json | {s} |" in compare_table([row])
    eff = row | {"label": "teacher", "role": "teacher", "size": {"params": 1, "disk_mb": 1},
                 "memory": {"peak_rss_mb": 1.0}, "timing": {"pairs_per_s": 1.0}}
    assert f"| **{s}** |" in efficiency_table([eff], 3.0)["markdown"]


def test_distill_score_command(tmp_path, capsys):
    import random

    from glotkit.cli import main
    from glotkit.hipe.data import default_schema

    gold, pred = _random_docs(random.Random(2), 8)
    del pred[0]["sampled_pairs"][:2]  # two gold pairs without a prediction

    def write(name, docs):
        f = tmp_path / name
        f.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        return str(f)

    g, p = write("HIPE-2026-v1.0-impresso-test-en.jsonl", gold), write("pred.jsonl", pred)
    r = score_file(gold, pred)
    assert main(["distill", "score", g, p]) == 0
    out = capsys.readouterr().out
    assert f"at macro recall         {r['at_macro_recall']:.4f} [" in out
    assert f"file score              {r['score']:.4f} [" in out and "binary file score" in out
    assert "targets at, isAt (data set 'impresso' in the file name)" in out
    assert "note: 2 of 64 gold pairs are not in the predictions: counted FALSE/FALSE" in out
    assert main(["distill", "score", g, p, "--json", "--targets", "at", "--resamples", "100"]) == 0
    got = json.loads(capsys.readouterr().out)
    en = got["languages"]["en"]
    assert en["targets"] == ["at"] and en["isAt_macro_recall"] is None and en["score"] == en["at_macro_recall"]
    assert en["at_macro_recall"] == r["at_macro_recall"] and got["profile"]["ci"]["resamples"] == 100
    assert len(en["ci"]["score"]) == 2 and en["missing_pairs"] == 2
    lit = write("HIPE-2026-v1.0-surprise-test-fr.jsonl", gold)
    assert main(["distill", "score", lit, g, "--resamples", "0"]) == 0
    out = capsys.readouterr().out
    assert "isAt macro recall         null" in out and "[" not in out and "targets at (data set 'surprise'" in out

    bad_pred = [dict(pred[0], document_id="nobody")]
    masked = [dict(d, sampled_pairs=[dict(x, at=None, isAt=None) for x in d["sampled_pairs"]]) for d in gold]
    cases = [([str(tmp_path / "none.jsonl"), p], "none.jsonl: HIPE file not found"),
             ([g, write("unknown.jsonl", bad_pred)], "unknown document id 'nobody'"),
             ([g, p, "--targets", "isat"], "--targets isat: give at or at,isAt"),
             ([g, p, "--resamples", "-1"], "--resamples -1"),
             ([write("masked.jsonl", masked), p], "no gold labels")]
    if default_schema() is not None:
        wrong = json.loads(json.dumps(pred))
        wrong[1]["sampled_pairs"][0]["at"] = "MAYBE"
        cases.append(([g, write("wrong.jsonl", wrong)], "wrong.jsonl: line 2: sampled_pairs[0].at: 'MAYBE' is not one of"))
    for argv, message in cases:
        assert main(["distill", "score", *argv]) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_fitted_offsets_undo_a_bias_towards_the_common_label():
    from glotkit.hipe.parse import VALID_LABELS
    from glotkit.hipe.predict import fit_offsets, score_rows, with_offsets

    rng = random.Random(0)
    docs, rows = [], []
    for d in range(30):
        pairs = []
        for k in range(4):
            at, is_at = rng.choice(VALID_LABELS[:4]) if k == 0 else ("FALSE", "FALSE")
            pairs.append({"pers_entity_id": f"p{k}", "pers_wikidata_QID": None, "pers_mentions_list": ["Smith"],
                          "loc_entity_id": f"l{k}", "loc_wikidata_QID": None, "loc_mentions_list": ["Bern"],
                          "at": at, "isAt": is_at})
            # a model biased to FALSE/FALSE by 3 nats whose scores still rank the gold option first
            # among the others
            logliks = {f"{a}/{i}": (-1.0 if (a, i) == (at, is_at) else -2.0 - rng.random()) for a, i in VALID_LABELS}
            logliks["FALSE/FALSE"] += 3.0 if (at, is_at) != ("FALSE", "FALSE") else 1.5
            best = max(logliks, key=logliks.get).split("/")
            rows.append({"key": [f"d{d}", f"p{k}", f"l{k}"], "at": best[0], "isAt": best[1], "parsed": True,
                         "corrected": False, "logliks": logliks})
        docs.append(_hipe_line(document_id=f"d{d}", sampled_pairs=pairs))
    gold = {"en": docs}
    assert all((r["at"], r["isAt"]) == ("FALSE", "FALSE") for r in rows)  # the raw decision: all FALSE/FALSE
    offsets, before, after = fit_offsets(rows, gold)
    assert before == pytest.approx(5 / 12) and after == pytest.approx(1.0)
    assert after == pytest.approx(score_rows(gold, with_offsets(rows, offsets), resamples=0)["profile"]["score"])
    assert set(offsets) == {"TRUE/TRUE", "PROBABLE/TRUE", "TRUE/FALSE", "PROBABLE/FALSE"}
    assert with_offsets(rows, {}) == rows and with_offsets([{"at": "TRUE", "isAt": "TRUE"}], offsets)[0]["at"] == "TRUE"
