"""HIPE-2026 distillation: prompt formats and their parsers, splits, trace generation and its
resume, the efficiency table and its ranks, bad input, and the recipe end to end on tiny models."""

from __future__ import annotations

import json
import random

import pytest

from glotkit.cli import main
from glotkit.errors import GlotkitError
from glotkit.hipe.formats import FORMATS, PromptBuilder, decoding, labels_text, parse, question, response

LABELS = [("TRUE", "TRUE"), ("TRUE", "FALSE"), ("PROBABLE", "TRUE"), ("PROBABLE", "FALSE"), ("FALSE", "FALSE")]


def _doc(doc_id: str, lang: str, n_pairs: int, seed: int) -> dict:
    rng = random.Random(seed)
    text = f"Herr Meier kam gestern nach Bern. {doc_id} " + "Die Stadt Zürich feierte. " * 3
    pairs = []
    for i in range(n_pairs):
        at, is_at = rng.choice(LABELS)
        pairs.append({"pers_entity_id": f"{doc_id}-p{i}", "pers_wikidata_QID": None, "pers_mentions_list": [f"Meier {i}"],
                      "loc_entity_id": f"{doc_id}-l{i}", "loc_wikidata_QID": None, "loc_mentions_list": ["Bern"],
                      "at": at, "at_explanation": None, "isAt": is_at, "isAt_explanation": None})
    return {"document_id": doc_id, "media": {"publication_title": "T", "time_period": "1900", "source_type": "Newspaper"},
            "source": "s", "language": lang, "date": "1900-01-02", "text": text, "sampled_pairs": pairs}


def _write_gold(tmp_path, langs=("de", "en"), docs=8, pairs=3):
    files = []
    for k, lang in enumerate(langs):
        f = tmp_path / f"gold-{lang}.jsonl"
        f.write_text("".join(json.dumps(_doc(f"{lang}{i}", lang, pairs, seed=100 * k + i)) + "\n" for i in range(docs)),
                     encoding="utf-8")
        files.append(str(f))
    return files


def test_trace_pairs_spread_over_the_label_combinations():
    from collections import Counter

    from glotkit.systems.distill import trace_items, training_items

    docs = [_doc(f"d{i}", "de", 6, seed=i) for i in range(12)] + [_doc(f"e{i}", "en", 6, seed=50 + i) for i in range(4)]
    # most pairs FALSE/FALSE, as in gold; one rare combination with 2 pairs
    for d in docs:
        for p in d["sampled_pairs"]:
            p["at"], p["isAt"] = "FALSE", "FALSE"
    for d, (at, is_at) in zip(docs, [("TRUE", "TRUE")] * 5 + [("PROBABLE", "TRUE")] * 2):
        d["sampled_pairs"][0]["at"], d["sampled_pairs"][0]["isAt"] = at, is_at
    splits = {"train": {"de": docs[:12], "en": docs[12:]}}
    assert trace_items(splits, None, 0) == training_items(splits)
    chosen = trace_items(splits, 8, 0)
    de = Counter(f"{p['at']}/{p['isAt']}" for d, p in chosen if d["language"] == "de")
    assert de == {"PROBABLE/TRUE": 2, "TRUE/TRUE": 3, "FALSE/FALSE": 3}  # round-robin: the rare ones all in
    assert sum(d["language"] == "en" for d, _ in chosen) == 8
    order = training_items(splits)
    assert [order.index(it) for it in chosen] == sorted(order.index(it) for it in chosen)  # training order kept
    assert chosen == trace_items(splits, 8, 0) and chosen != trace_items(splits, 8, 1)  # seeded


def test_every_format_parses_its_own_training_target():
    for fmt in FORMATS:
        for at, is_at in LABELS:
            target = response(fmt, at, is_at, "Meier came to Bern yesterday." if fmt.startswith("explain") else None)
            r = parse(fmt, target)
            assert (r.at, r.isAt, r.ok) == (at, is_at, True), (fmt, target)
    assert parse("plain", "\nat: probable\nisAt: False\nmore") .at == "PROBABLE"
    assert parse("plain", "at: TRUE").error == "no 'isAt: LABEL' line"
    r = parse("explain-plain", " He was there.\nAnswer: at: FALSE\nisAt: TRUE")
    assert (r.at, r.isAt, r.corrected) == ("TRUE", "TRUE", True)
    # explain formats read only what follows the last "Answer:"
    r = parse("explain-json", ' {"at": "FALSE", "isAt": "FALSE"} was the template.\nAnswer: {"at": "TRUE", "isAt": "TRUE"}')
    assert (r.at, r.isAt) == ("TRUE", "TRUE")
    assert decoding("json", 8, 64).stop == ("}",) and decoding("explain-json", 8, 64).max_new_tokens == 64
    with pytest.raises(GlotkitError, match="needs an explanation"):
        response("explain-json", "TRUE", "TRUE")


def test_cut_at_stop_can_keep_the_stop_string():
    from glotkit.generate.local import cut_at_stop

    assert cut_at_stop(' {"at": "TRUE"} tail', ["}"], keep=True) == ' {"at": "TRUE"}'
    assert cut_at_stop(' {"at": "TRUE"} tail', ["}"]) == ' {"at": "TRUE"'
    assert cut_at_stop("no stop", ["}"], keep=True) is None


def test_prompt_builder_chat_and_plain(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    doc = _doc("d", "de", 1, 0)
    q = question(doc, doc["sampled_pairs"][0], "json", 200)
    assert "Person: Meier 0" in q and "Place: Bern" in q and "published 1900-01-02" in q and '"isAt"' in q
    plain = PromptBuilder(tok)
    assert not plain.chat and tok.decode(plain.prompt_ids(q, "json")).endswith("\nAnswer:")
    ex = plain.example(q, "json", response("json", "TRUE", "FALSE"))
    target = [t for t, y in zip(ex.input_ids, ex.labels) if y != -100]
    assert tok.decode(target[:-1]) == ' {"at": "TRUE", "isAt": "FALSE"}' and target[-1] == tok.eos_token_id
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    chat = PromptBuilder(tok)
    assert chat.chat and tok.decode(chat.prompt_ids(q, "explain-json")).endswith("</s><s>Explanation:")


def test_splits_are_by_document_seeded_and_disjoint(tmp_path):
    from glotkit.systems import validate_recipe
    from glotkit.systems.distill import make_splits

    files = _write_gold(tmp_path, docs=10, pairs=4)
    recipe = validate_recipe({"task": "distill", "distill": {"data": files, "train_pairs": 5, "dev_pairs": None,
                                                             "test_pairs": None, "test_ratio": 0.3, "dev_ratio": 0.2}})
    s = make_splits(recipe)
    assert make_splits(recipe) == s
    for lang in ("de", "en"):
        ids = [{d["document_id"] for d in s[name][lang]} for name in ("train", "dev", "test")]
        assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
        assert sum(len(d["sampled_pairs"]) for d in s["train"][lang]) == 5
        assert len(ids[2]) == 3 and sum(len(d["sampled_pairs"]) for d in s["test"][lang]) == 12
    small = _write_gold(tmp_path / "..", langs=("fr",), docs=1, pairs=2)
    with pytest.raises(GlotkitError, match="too few"):
        make_splits(validate_recipe({"task": "distill", "distill": {"data": small}}))
    with pytest.raises(GlotkitError, match="appears twice"):
        make_splits(validate_recipe({"task": "distill", "distill": {"data": files + files[:1]}}))


def _rows(label, role, score, params, disk, langs):
    return {"label": label, "role": role, "format": "json", "size": {"params": params, "disk_mb": disk},
            "memory": {"peak_rss_mb": 100.0}, "timing": {"pairs_per_s": 1.0}, "parse_failure_rate": 0.0,
            "profile": {"score": score, "binary_score": score},
            "languages": {k: {"score": v} for k, v in langs.items()}}


def test_efficiency_table_ranks_and_the_within_question():
    from glotkit.systems.distill import efficiency_table

    t = efficiency_table([
        _rows("teacher", "teacher", 0.60, 300, 500, {"de": 0.60, "en": 0.62, "fr": 0.58}),
        _rows("small", "student", 0.59, 100, 200, {"de": 0.59, "en": 0.61, "fr": 0.57}),
        _rows("tiny", "student", 0.50, 100, 100, {"de": 0.59, "en": 0.40, "fr": 0.51}),
    ], within=3.0)
    ranks = {r["label"]: r["rank"] for r in t["rows"]}
    assert ranks["teacher"] == {"accuracy": 1, "params": 3, "size": 3, "mean": 2.33, "overall": 3}
    assert ranks["small"]["params"] == ranks["tiny"]["params"] == 1  # ties share the better rank
    assert ranks["small"]["overall"] == 1 and ranks["tiny"]["size"] == 1
    assert "within 3 points in every language" in t["answer"][0] and "de -1.00" in t["answer"][0]
    assert "NOT within 3 points (worst -22.00)" in t["answer"][1]
    assert "| teacher | json | 0.0M | 500 |" in t["markdown"]


def _tiny_teacher(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glotkit.config import LoraSection
    from glotkit.models.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(str(path))
    return apply_lora(model, LoraSection(r=2, alpha=4)), AutoTokenizer.from_pretrained(str(path))


def test_trace_generation_resumes_after_an_interruption(tmp_path, tiny_llama, monkeypatch):
    import glotkit.io as gio
    import glotkit.systems.distill as distill
    from glotkit.systems import validate_recipe

    files = _write_gold(tmp_path, docs=6, pairs=3)
    recipe = validate_recipe({"task": "distill", "seed": 1, "distill": {
        "data": files, "train_pairs": None, "test_ratio": 0.2, "dev_ratio": 0.0, "batch_size": 3,
        "explain_tokens": 6, "label_tokens": 6, "max_chars": 200},
        "generate": {"batch_tokens": 0}})  # batches of batch_size pairs, so that there is a third to kill
    splits = distill.make_splits(recipe)
    n = sum(len(d["sampled_pairs"]) for ds in splits["train"].values() for d in ds)
    monkeypatch.setattr(distill, "_usable", lambda text: bool(text))  # a random model's words count
    model, tok = _tiny_teacher(tiny_llama)

    full = tmp_path / "full"
    distill.write_traces(recipe, full, splits, log=lambda m: None, progress=False, model=model, tok=tok)

    real, calls = gio.append_rows, []

    def killed(fh, rows):  # the third batch is torn mid-line, then the process "dies"
        calls.append(1)
        if len(calls) == 3:
            fh.write(json.dumps(rows[0])[:15])
            fh.flush()
            raise KeyboardInterrupt
        real(fh, rows)

    cut = tmp_path / "cut"
    monkeypatch.setattr(gio, "append_rows", killed)
    with pytest.raises(KeyboardInterrupt):
        distill.write_traces(recipe, cut, splits, log=lambda m: None, progress=False, model=model, tok=tok)
    assert not (cut / "traces" / "summary.json").exists()
    monkeypatch.setattr(gio, "append_rows", real)
    logs = []
    summary = distill.write_traces(recipe, cut, splits, log=logs.append, progress=False, model=model, tok=tok)
    assert any("already written, continuing" in m for m in logs)
    for name in ("explanations.jsonl", "checked.jsonl"):
        keys = [json.loads(line)["key"] for line in (cut / "traces" / name).read_text().splitlines()]
        assert len(keys) == len(set(keys)) == n, name
    assert (cut / "traces" / "traces.jsonl").read_text() == (full / "traces" / "traces.jsonl").read_text()
    assert summary["written"] == n and sum(c["written"] for c in summary["counts"].values()) == n


def test_logit_level_needs_one_vocabulary(tmp_path, tiny_llama):
    from conftest import build_model
    from glotkit.systems.distill import check_logit_level

    other = tmp_path / "other"
    _, tok = build_model(other, "llama")
    tok.add_tokens(["Zürich", "Genève"])
    tok.save_pretrained(other)
    with pytest.raises(GlotkitError, match="different vocabularies.*use level: response"):
        check_logit_level(str(tiny_llama), str(other), "s")
    with pytest.raises(GlotkitError, match="trimmed vocabulary"):
        check_logit_level(str(tiny_llama), str(tiny_llama), "s", trimmed=True)


def test_distill_recipe_end_to_end(tmp_path, tiny_llama, tiny_gemma, monkeypatch, capsys):
    import glotkit.hipe.formats as formats
    import glotkit.systems.distill as distill
    from glotkit.hipe.parse import Parsed

    files = _write_gold(tmp_path, docs=8, pairs=3)
    # a random teacher neither explains nor answers: let its check answer FALSE/FALSE, so the
    # traces of FALSE/FALSE gold pairs are kept and the others dropped
    monkeypatch.setattr(distill, "_usable", lambda text: bool(text))
    real_parse = formats.parse
    monkeypatch.setattr(formats, "parse", lambda fmt, text: Parsed("FALSE", "FALSE", True)
                        if text.startswith("Answer:") else real_parse(fmt, text))
    import glotkit.hipe.predict as predict

    monkeypatch.setattr(predict, "choose_labels", lambda scores: ("FALSE", "FALSE"))  # the check, in this process
    recipe = tmp_path / "d.yaml"
    recipe.write_text(json.dumps({
        "name": "d", "task": "distill", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_gemma)},
        "distill": {"data": files, "train_pairs": None, "dev_pairs": 2, "test_pairs": 3, "max_chars": 200,
                    "label_tokens": 4, "explain_tokens": 6, "batch_size": 4, "trace_check": False,
                    "dev_curve": True, "calibrate": True,
                    "compare_models": [str(tiny_llama)], "compare_formats": ["json", "explain-plain"],
                    "students": [{"name": "llama", "model": str(tiny_llama)},
                                 {"name": "trimmed", "model": str(tiny_gemma), "trim_vocab": True}]},
        "lora": {"r": 2, "alpha": 4, "target_modules": "all-linear"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-4, "max_length": 4096},
    }), encoding="utf-8")
    assert main(["distill", "compare", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "d"
    assert (run / "compare" / "table.md").read_text().count(f"| {tiny_llama} |") == 2
    assert main(["distill", "teach", "--no-progress", str(recipe)]) == 0
    curve = [json.loads(x) for x in (run / "teacher" / "curve.jsonl").read_text().splitlines()]
    dev_pairs = sum(len(json.loads(x)["sampled_pairs"]) for x in (run / "split" / "dev.jsonl").read_text().splitlines())
    steps = json.loads((run / "teacher" / "train" / "result.json").read_text())["steps"]
    assert [r["epoch"] for r in curve] == [1, 2] and curve[-1]["step"] == steps
    assert all(r["pairs"] == dev_pairs and set(r["languages"]) == {"de", "en"} and r["chosen"] == {"FALSE/FALSE": dev_pairs}
               for r in curve)
    traces = [json.loads(x) for x in (run / "traces" / "traces.jsonl").read_text().splitlines()]
    train_docs = [json.loads(x) for x in (run / "split" / "train.jsonl").read_text().splitlines()]
    gold_ff = sum((p["at"], p["isAt"]) == ("FALSE", "FALSE") for d in train_docs for p in d["sampled_pairs"])
    assert len(traces) == gold_ff > 0 and all((t["at"], t["isAt"]) == ("FALSE", "FALSE") for t in traces)
    assert main(["distill", "student", "--no-progress", str(recipe)]) == 0
    table = json.loads((run / "evaluate" / "table.json").read_text())
    labels = [r["label"] for r in table["rows"]]
    assert labels == ["teacher (untuned)", "teacher", "llama (untuned)", "llama", "trimmed (untuned)", "trimmed"]
    test_docs = [json.loads(x) for x in (run / "split" / "test.jsonl").read_text().splitlines()]
    test_ids = {d["document_id"] for d in test_docs}
    assert not test_ids & {d["document_id"] for d in train_docs}
    for r in table["rows"]:  # labels chosen by log-likelihood (in the worker processes): nothing to parse
        assert r["parse_failure_rate"] == 0.0
        assert r["peak_rss_mb"] > 0 and r["params"] > 0 and r["pairs_per_s"] > 0 and set(r["languages"]) == {"de", "en"}
        cal = r["calibration"]  # fit on the dev split's answers, kept beside the test's
        assert cal["dev_pairs"] == dev_pairs and cal["dev_score_calibrated"] >= cal["dev_score"]
        assert set(cal["offsets"]) == {"TRUE/TRUE", "PROBABLE/TRUE", "TRUE/FALSE", "PROBABLE/FALSE"}
        assert 0 <= cal["test_uncalibrated"]["score"] <= 1
    kept = json.loads((run / "evaluate" / "teacher" / "calibration.json").read_text())
    assert kept["offsets"] == table["rows"][1]["calibration"]["offsets"]
    from glotkit.hipe.predict import with_offsets

    monkeypatch.undo()  # the real decision again
    answers = [json.loads(x) for x in (run / "evaluate" / "teacher" / "answers.jsonl").read_text().splitlines()]
    assert answers == with_offsets(answers, kept["offsets"])  # the test labels are the calibrated decision
    pred = [json.loads(x) for x in (run / "evaluate" / "trimmed" / "predictions-de.jsonl").read_text().splitlines()]
    assert [d["document_id"] for d in pred] == [d["document_id"] for d in test_docs if d["language"] == "de"]
    trim = json.loads((run / "students" / "trimmed" / "model" / "glotkit-trim.json").read_text())
    assert trim["vocab_after"] < trim["vocab_before"] and trim["check"]["max_abs_logit_diff"] < 1e-4
    refs = table["references"]  # what a model must beat, on the same test pairs
    assert list(refs) == ["FALSE/FALSE everywhere", "mention positions (logistic regression)"]
    from glotkit.hipe.predict import score_rows
    from glotkit.systems.distill import _by_language

    gold = _by_language(test_docs, "test")
    all_ff = [{"key": [d["document_id"], p["pers_entity_id"], p["loc_entity_id"]], "at": "FALSE", "isAt": "FALSE",
               "parsed": True, "corrected": False} for d in test_docs for p in d["sampled_pairs"]]
    assert refs["FALSE/FALSE everywhere"]["score"] == score_rows(gold, all_ff, resamples=0)["profile"]["score"]
    assert all(0 <= r["score"] <= 1 and r["ci"][0] <= r["score"] <= r["ci"][1] for r in refs.values())
    assert sum("FALSE/FALSE everywhere" in a and "mention-position regression" in a for a in table["answer"]) == 3
    report = (run / "report.md").read_text()
    for part in ("What a model must beat", "| FALSE/FALSE everywhere | ",
                 "## 1. Prompt comparison", "## 2. Teacher and its traces", "The teacher on the dev split after each epoch",
                 "## 3. Students",
                 "## Efficiency and accuracy", "Does the student stay within 3 points", "student 'llama' vs teacher",
                 "`teacher`, isAt:", "| gold \\ predicted | TRUE | PROBABLE | FALSE |",
                 "Label decisions calibrated on the dev split", "- `trimmed`: dev "):
        assert part in report, part
    capsys.readouterr()
    assert main(["run", "--no-progress", str(recipe)]) == 0  # everything done: nothing is redone
    err = capsys.readouterr().err
    assert "trained before, kept" in err and "written before, kept" in err and "steps in" not in err


def test_distill_bad_input(tmp_path, tiny_llama, tiny_gemma, capsys):
    files = _write_gold(tmp_path, docs=6, pairs=2)
    recipe = tmp_path / "d.yaml"

    def run(**distill):
        recipe.write_text(json.dumps({"name": "d", "task": "distill", "runs_dir": str(tmp_path / "runs"),
                                      "model": {"name": str(tiny_llama)}, "distill": {"data": files} | distill}))
        code = main(["run", "--no-progress", str(recipe)])
        return code, capsys.readouterr().err

    code, err = run(students=[{"name": "a", "model": str(tiny_llama)}, {"name": "a", "model": str(tiny_gemma)}])
    assert code == 2 and "the name 'a' is used twice" in err
    code, err = run(data=[])
    assert code == 2 and "distill.data: no gold HIPE-2026 files given" in err
    broken = tmp_path / "broken.jsonl"
    doc = _doc("x", "en", 1, 0)
    doc["sampled_pairs"][0]["pers_mentions_list"] = [" "]
    broken.write_text(json.dumps(_doc("y", "en", 1, 0)) + "\n" + json.dumps(doc) + "\n")
    code, err = run(data=[str(broken)])
    assert code == 2 and "broken.jsonl: line 2: sampled_pairs[0].pers_mentions_list: empty" in err
    # a student larger than the teacher is a warning, not an error
    from glotkit.systems import validate_recipe
    from glotkit.systems.distill import check_inputs

    big = tmp_path / "big"
    from conftest import build_model

    build_model(big, "llama", hidden=64)
    warned = []
    check_inputs(validate_recipe({"task": "distill", "model": {"name": str(tiny_llama)}, "distill": {
        "data": files, "students": [{"name": "big", "model": str(big)}]}}), log=warned.append)
    assert any("is larger than the teacher" in m for m in warned)
    with pytest.raises(GlotkitError, match="stages: 'train' is not a stage of system 'distill'"):
        validate_recipe({"task": "distill", "stages": ["train"]})
    assert main(["distill", "compare", str(tmp_path / "none.yaml")]) == 2
    assert labels_text("TRUE", "FALSE", "plain") == "at: TRUE\nisAt: FALSE"


class _ScriptedGenerator:
    """A generator whose explanations and option scores are given: option i of prompt j scores scores[j][i]."""

    def __init__(self, tokenizer, scores, explanation="Meier was in Bern."):
        self.tokenizer, self.scores, self.explanation = tokenizer, scores, explanation
        self.scored_prompts, self.sampled = [], 0

    def sample(self, prompts, **kw):
        from glotkit.generate import Generations

        self.sampled += len(prompts)
        return Generations([self.explanation] * len(prompts), 5 * len(prompts))

    def option_logliks(self, prompts, options, **kw):
        assert options == [" " + labels_text(a, i, "json") for a, i in
                           [("TRUE", "TRUE"), ("PROBABLE", "TRUE"), ("TRUE", "FALSE"), ("PROBABLE", "FALSE"),
                            ("FALSE", "FALSE")]]
        self.scored_prompts += [self.tokenizer.decode(p) for p in prompts]
        return [self.scores[len(self.scored_prompts) - len(prompts) + k] for k in range(len(prompts))]


@pytest.mark.parametrize("fmt", ["json", "explain-json"])
def test_loglik_labels_are_the_likeliest_valid_combination(tiny_llama, fmt):
    from transformers import AutoTokenizer

    from glotkit.hipe.parse import VALID_LABELS
    from glotkit.hipe.predict import Settings, predict_pairs, score_rows

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    doc = _doc("d1", "de", 5, seed=3)
    items = [(doc, p) for p in doc["sampled_pairs"]]
    # prompt k prefers valid combination k (one of each)
    scores = [[-5.0 + (4.0 if i == k else 0.0) for i in range(5)] for k in range(5)]
    gen = _ScriptedGenerator(tok, scores)
    rows, timing = predict_pairs(gen, items, Settings(fmt=fmt, batch_size=2), progress=False)
    assert [(r["at"], r["isAt"]) for r in rows] == list(VALID_LABELS)
    assert all(r["parsed"] and r["logliks"] for r in rows)
    assert score_rows({"de": [doc]}, rows)["parse_failures"] == 0
    # offsets move the choice (prompt 0 prefers TRUE/TRUE by 4 nats) and the rows keep the raw scores
    shifted, _ = predict_pairs(_ScriptedGenerator(tok, scores), items[:1],
                               Settings(fmt=fmt, batch_size=2, offsets={"TRUE/TRUE": -4.5}), progress=False)
    assert (shifted[0]["at"], shifted[0]["isAt"]) == ("PROBABLE", "TRUE") and shifted[0]["logliks"] == rows[0]["logliks"]
    if fmt == "explain-json":  # the explanation is generated, then the labels scored after it
        assert gen.sampled == 5 and all(p.endswith("Meier was in Bern.\nAnswer:") for p in gen.scored_prompts)
        assert rows[0]["raw"] == ' Meier was in Bern.\nAnswer: {"at": "TRUE", "isAt": "TRUE"}'
        assert parse(fmt, rows[0]["raw"]).at == "TRUE"
    else:
        assert gen.sampled == 0 and all(p.endswith("Answer:") for p in gen.scored_prompts)


def test_loglik_labels_on_a_real_tiny_model_match_full_sequence_scores(tiny_llama):
    """The option scores are the summed log-probabilities of each option's tokens after the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glotkit.generate.local import LocalGenerator
    from glotkit.hipe.formats import label_options
    from glotkit.hipe.predict import Settings, choose_labels, predict_pairs

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    doc = _doc("d2", "en", 3, seed=4)
    items = [(doc, p) for p in doc["sampled_pairs"]]
    rows, _ = predict_pairs(LocalGenerator(model, tok, "cpu"), items, Settings(fmt="plain", batch_size=4),
                            progress=False)
    builder = PromptBuilder(tok)
    for (d, p), r in zip(items, rows):
        prompt = builder.prompt_ids(question(d, p, "plain", 1200), "plain")
        want = []
        for opt in label_options("plain"):
            ids = tok(opt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            want.append(float(logp[range(len(ids)), ids].sum()))
        got = list(r["logliks"].values())
        assert got == pytest.approx(want, abs=2e-3)
        assert (r["at"], r["isAt"]) == choose_labels(want)


def test_article_layout_shares_the_prompt_start_within_a_document():
    from glotkit.hipe.formats import question

    doc = _doc("d3", "de", 3, seed=5)
    a, b = (question(doc, p, "json", 60, layout="article") for p in doc["sampled_pairs"][:2])
    cut = a.index("Person:")
    assert a[:cut] == b[:cut] and a[cut:] != b[cut:]  # the pair comes last, after the same article
    assert a.endswith("Person: Meier 0\nPlace: Bern") and "Meier 1" not in a[cut:]
    old = question(doc, doc["sampled_pairs"][0], "json", 60)  # the pair layout keeps its order
    assert old.index("Person:") < old.index("at: TRUE if")
    with pytest.raises(GlotkitError, match="unknown 'sideways'"):
        question(doc, doc["sampled_pairs"][0], "json", 60, layout="sideways")


def test_label_repeats_soften_the_imbalance():
    from glotkit.systems.distill import label_repeats

    def items(n, at, is_at):
        return [({}, {"at": at, "isAt": is_at})] * n

    got = label_repeats(items(690, "FALSE", "FALSE") + items(245, "TRUE", "TRUE") + items(34, "PROBABLE", "TRUE"))
    assert got == {"FALSE/FALSE": 1, "TRUE/TRUE": 2, "PROBABLE/TRUE": 5}  # round(sqrt(690/34)) = round(4.5) = 5


def test_predict_labels_a_masked_file_and_resumes(tmp_path, tiny_llama, capsys):
    """`glotkit distill predict`: every document and pair id kept in order, labels filled in (valid
    combinations), the file passes the schema, answers already written are kept."""
    files = _write_gold(tmp_path, docs=6, pairs=3)
    recipe = tmp_path / "p.yaml"
    recipe.write_text(json.dumps({
        "name": "p", "system": "distill", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_llama)},
        "distill": {"data": files, "train_pairs": None, "dev_ratio": 0.0, "max_chars": 200, "batch_size": 4,
                    "students": []},
        "lora": {"r": 2, "alpha": 4, "target_modules": "all-linear"},
        "train": {"max_steps": 1, "batch_size": 4, "max_length": 4096}}), encoding="utf-8")
    assert main(["train", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "p"
    masked = tmp_path / "masked-de.jsonl"
    docs = [json.loads(x) for x in open(files[0], encoding="utf-8")]
    for d in docs:
        for p in d["sampled_pairs"]:
            p["at"] = p["isAt"] = None
    masked.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "sub" / "pred-de.jsonl"
    # an interrupted earlier run answered the first pair (marked: it must be kept as it is)
    first = docs[0]["sampled_pairs"][0]
    out.parent.mkdir()
    partial = out.with_name(out.name + ".partial.jsonl")
    partial.write_text(json.dumps({"key": [docs[0]["document_id"], first["pers_entity_id"], first["loc_entity_id"]],
                                   "language": "de", "raw": "kept", "at": "PROBABLE", "isAt": "TRUE", "parsed": True,
                                   "corrected": False, "error": None}) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["distill", "predict", str(run), "--input", str(masked), "--output", str(out), "--no-progress"]) == 0
    assert "1 of 18 answers already written, continuing" in capsys.readouterr().err
    from glotkit.hipe.data import read_hipe
    from glotkit.hipe.parse import VALID_LABELS

    got = read_hipe(out)  # passes the schema
    assert [d["document_id"] for d in got] == [d["document_id"] for d in docs]
    for g, d in zip(got, docs):
        assert [(p["pers_entity_id"], p["loc_entity_id"]) for p in g["sampled_pairs"]] == \
            [(p["pers_entity_id"], p["loc_entity_id"]) for p in d["sampled_pairs"]]
        assert all((p["at"], p["isAt"]) in VALID_LABELS for p in g["sampled_pairs"])
    assert (got[0]["sampled_pairs"][0]["at"], got[0]["sampled_pairs"][0]["isAt"]) == ("PROBABLE", "TRUE")
    assert not partial.exists()
    for argv, needle in [(["--model", "student.nobody"], "--model student.nobody: not a model of this run"),
                         (["--output", str(masked)], "is the input file")]:
        argv = ["distill", "predict", str(run), "--input", str(masked), "--output", str(out), *argv]
        assert main(argv) == 2
        assert needle in capsys.readouterr().err
    assert main(["distill", "predict", str(tmp_path), "--input", str(masked), "--output", str(out)]) == 2
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err


def test_rationale_checks():
    from glotkit.hipe.rationale import check, grounded, names

    doc = {"text": "Herr Meier kam gestern mit dem Zug nach Bern und sprach im Rathaus über die Steuern."}
    pair = {"pers_mentions_list": ["Herr Meier"], "loc_mentions_list": ["Bern"]}
    quote = "According to the article, Meier kam gestern mit dem Zug nach Bern."
    assert check(quote, doc, pair) == {"person": True, "place": True, "grounded": True}
    invented = "According to the article, Meier was appointed the first cardinal of the new diocese in Rome."
    assert check(invented, doc, pair) == {"person": True, "place": False, "grounded": False}
    assert grounded("Meier sprach gestern Rathaus Steuern Bern", doc["text"])  # a paraphrase: its words
    assert not names("He went to Bernhardsthal", ["Bern"])  # whole words only
    assert names("MEIER spoke", ["Herr Meier"])  # a title is not required
    assert names("the UN met", ["UN"]) and not names("unless", ["UN"])


def test_an_evaluation_made_with_other_settings_is_labelled_again(tmp_path, tiny_llama):
    """evaluate_model reuses result.json only when it was made with the same settings (the batch
    size aside): a decision calibrated since, another format or excerpt length labels again."""
    from pathlib import Path

    from glotkit.hipe.predict import Settings, evaluate_model

    items = Path(_write_gold(tmp_path, langs=("de",), docs=2, pairs=2)[0])
    out, logs = tmp_path / "eval", []

    def run(**kw):
        s = Settings(**{"fmt": "json", "max_chars": 200, "label_tokens": 4, "batch_size": 4} | kw)
        return evaluate_model("m", {"name": str(tiny_llama)}, None, items, s, out, in_process=True, progress=False,
                              log=logs.append)

    first = run()
    assert first["made_with"]["offsets"] is None and "batch_size" not in first["made_with"]
    logs.clear()
    assert run(batch_size=1) == first and not logs  # the batch size changes no answer: reused
    again = run(offsets={"TRUE/TRUE": 50.0})
    assert any("labelled before with offsets = None, now {'TRUE/TRUE': 50.0}: labelling again" in m for m in logs)
    assert again["made_with"]["offsets"] == {"TRUE/TRUE": 50.0}
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert all((a["at"], a["isAt"]) == ("TRUE", "TRUE") for a in answers)  # the new decision, not the old file
    logs.clear()
    run(offsets={"TRUE/TRUE": 50.0}, max_chars=100)
    assert any("max_chars = 200, now 100" in m for m in logs)
