"""The task suite: batch-size invariance, seeded shots, log-likelihood scoring, errors, loaders."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED, build_model
from glotkit.errors import GlotkitError
from glotkit.eval.suite import (
    BUILTIN_TASKS,
    Task,
    build_prompt,
    draw_shots,
    get_tasks,
    load_task_file,
    parse_label,
    parse_letters,
    parse_number,
    run_suite,
    run_task,
)
from glotkit.generate.local import LocalGenerator, cut_at_stop
from glotkit.models.lm import option_logliks

WORDS = ["Sibiu", "Cibin", "Iași", "Mureș", "Brașov", "Dunăre", "Carpați", "Cluj"]


def _toy_task():
    rows = [{"text": " ".join(WORDS[(i * 3 + j) % 8] for j in range(3 + i % 5)), "label": ["pozitivă", "negativă"][i % 2]}
            for i in range(40)]
    data = {"train": rows[:20], "test": rows[20:]}
    task = Task("toy", "classification", "toy", lambda root: data, "Recenzie: {text}\nRăspuns:",
                lambda r: r["label"], ["pozitivă", "negativă"], max_new_tokens=4)
    return task, data


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_results_do_not_depend_on_batch_size(tmp_path, mode):
    model, tok = build_model(tmp_path, "gemma3", init=0.2)
    task, data = _toy_task()
    runs = [run_task(LocalGenerator(model, tok), task, data, shots=2, seed=7, mode=mode, limit=12, batch_size=b) for b in (1, 8)]
    assert [p["prediction"] for p in runs[0]["predictions"]] == [p["prediction"] for p in runs[1]["predictions"]]
    if mode == "generate":
        assert [p["generation"] for p in runs[0]["predictions"]] == [p["generation"] for p in runs[1]["predictions"]]
    assert runs[0]["mode"] == mode and runs[0]["metrics"] == runs[1]["metrics"]


@pytest.mark.parametrize("arch,share", [("llama", False), ("llama", True), ("gemma3", True)])
def test_loglik_equals_direct_computation(tmp_path, arch, share):
    model, tok = build_model(tmp_path, arch, init=0.2)
    model.eval()
    prompts = [tok("Recenzie: Sibiu Cibin\nRăspuns:")["input_ids"], tok("Recenzie: Iași " * 12 + "\nRăspuns:")["input_ids"]]
    plain = [" pozitivă", " negativă", " A, C"]
    # options that begin alike (their shared tokens are scored once per prompt)
    alike = [' {"at": "TRUE", "isAt": "TRUE"}', ' {"at": "PROBABLE", "isAt": "FALSE"}', ' {"at": "FALSE", "isAt": "FALSE"}']
    for texts in (plain, alike):
        options = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        got = option_logliks(model, tok, prompts, options, batch_size=3, share_prompt=share)
        for i, p in enumerate(prompts):
            for j, o in enumerate(options):
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=torch.tensor([p + o])).logits[0].float(), -1)
                want = sum(logp[len(p) - 1 + t, o[t]].item() for t in range(len(o)))
                assert got[i][j] == pytest.approx(want, abs=1e-4)
    assert options[0][:3] == options[1][:3]  # the alike options do share their first tokens


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prompts_sharing_a_prefix_share_a_row_and_score_as_alone(tmp_path, arch):
    """Prompts that begin alike (an instruction, the same demonstrations) are packed into one row:
    the common part once, each prompt's own tokens and its options after it.  Every score equals
    the prompt + option computed alone, whatever the grouping, the batch size or the row cap."""
    from glotkit.models import lm

    model, tok = build_model(tmp_path, arch, init=0.2)
    model.eval()
    instruction = "Instrucțiune: spune dacă recenzia este pozitivă sau negativă. " * 3
    texts = [instruction + "Recenzie: Sibiu Cibin\nRăspuns:", instruction + "Recenzie: Iași Prut Iași\nRăspuns:",
             "Recenzie: scurtă\nRăspuns:", instruction + "Recenzie: Sibiu Cibin\nRăspuns:",  # the same prompt twice
             instruction + "Recenzie: Dunărea\nRăspuns:", instruction[:-2]]  # a prefix of the others
    prompts = [tok(t)["input_ids"] for t in texts]
    groups = [members for _, members in lm.prefix_groups(prompts, lm.PREFIX_KEY, min_share=0.25)]
    assert max(map(len, groups)) >= 4 and sum(map(len, groups)) == len(prompts)
    for texts_o in ([" pozitivă", " negativă"], [' {"at": "TRUE"}', ' {"at": "FALSE"}', ' {"at": "PROBABLE"}']):
        options = [tok(t, add_special_tokens=False)["input_ids"] for t in texts_o]
        want = []
        for p in prompts:
            with torch.no_grad():
                rows = []
                for o in options:
                    logp = torch.log_softmax(model(input_ids=torch.tensor([p + o])).logits[0].float(), -1)
                    rows.append(sum(logp[len(p) - 1 + t, o[t]].item() for t in range(len(o))))
            want.append(rows)
        results = []
        for batch_size, cap, per_pass in ((1, 1024, 4096), (8, 1024, 4096), (8, 60, 4096), (8, 1024, 1)):
            old = lm.OPTION_ROW_TOKENS, lm.OPTION_PASS_TOKENS
            lm.OPTION_ROW_TOKENS, lm.OPTION_PASS_TOKENS = cap, per_pass  # rows split; one row a pass
            try:
                results.append(option_logliks(model, tok, prompts, options, batch_size=batch_size))
            finally:
                lm.OPTION_ROW_TOKENS, lm.OPTION_PASS_TOKENS = old
            for g, w in zip(results[-1], want):
                assert g == pytest.approx(w, abs=1e-4)
        assert results[0] == results[1]  # the batch size does not change a single bit
    # the shared row computes the instruction once
    shared = [p for p in prompts if len(p) > 30][:3]
    row, _ = lm._option_row(shared, options, 0)
    assert len(row.input_ids) < sum(len(p) + sum(map(len, options)) for p in shared) - 2 * 20


def test_shots_are_reproducible_from_the_seed():
    task, data = _toy_task()
    a = [draw_shots(data["train"], 3, seed=5, index=i) for i in range(5)]
    assert a == [draw_shots(data["train"], 3, seed=5, index=i) for i in range(5)]
    assert a != [draw_shots(data["train"], 3, seed=6, index=i) for i in range(5)]
    prompt = build_prompt(task, data["test"][0], a[0])
    assert prompt.count("Recenzie:") == 4 and prompt.endswith("Răspuns:")
    with pytest.raises(GlotkitError, match="k=21 is larger than the task's train split"):
        draw_shots(data["train"], 21, seed=0, index=0)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(GlotkitError, match="unknown task 'emotions'.*sentiment"):
        get_tasks(["emotions"])
    model, tok = build_model(tmp_path, "llama")
    task, data = _toy_task()
    bad = Task("bad", "classification", "", task.load, "Text: {review}\nRăspuns:", task.answer, task.labels)
    with pytest.raises(GlotkitError, match="template needs field 'review'"):
        run_task(LocalGenerator(model, tok), bad, data, shots=0, seed=0, mode="generate", limit=2, batch_size=2)


def test_parsers():
    assert parse_label(" Negativă, clar.", ["pozitivă", "negativă"]) == "negativă"
    assert parse_label(" nu știu", ["pozitivă", "negativă"]) is None
    assert parse_number(" 3,5 din 5") == 3.5 and parse_number(" n/a") is None


@pytest.mark.integration
@pytest.mark.parametrize("name", [n for n, t in BUILTIN_TASKS.items() if not t.needs_file])
def test_builtin_loaders(name):
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data not present")
    task = BUILTIN_TASKS[name]
    data = task.load(SHARED / "data")
    assert len(data["test"]) >= 300 and len(data["train"]) >= 40
    assert task.fields() <= set(data["test"][0])
    if task.kind == "classification":
        assert {task.answer(r) for r in data["test"]} <= set(task.labels)
    if task.kind == "multichoice":  # JuRO: one or two of A–C, every record parses
        golds = [task.gold(r) for r in data["test"] + data["train"]]
        assert all(1 <= len(g) <= 2 and g <= {"A", "B", "C"} for g in golds)
        assert len(data["train"]) == 7952 and len(data["test"]) == 1151
    if task.kind == "qa":  # shots never share a paragraph with a test question
        assert not {r["context"] for r in data["train"]} & {r["context"] for r in data["test"]}


def test_parse_letters():
    assert parse_letters(" A") == {"A"} and parse_letters("AB") == {"A", "B"}
    assert parse_letters(" A, C\nB") == {"A", "C"} and parse_letters("(B) și (C).") == {"B", "C"}
    assert parse_letters("\n B și C") == {"B", "C"} and parse_letters(" A.") == {"A"}
    assert parse_letters(" Acesta este răspunsul") is None and parse_letters(" nu știu") is None
    assert parse_letters(" D") is None


def test_stop_strings():
    assert cut_at_stop(" pozitivă\nRecenzie:", ["\n"]) == " pozitivă"
    assert cut_at_stop("\n\n pozitivă", ["\n"]) is None  # leading blank lines do not stop
    assert cut_at_stop(" Un rezumat.\nMai departe.\n\nText:", ["\n\n"]) == " Un rezumat.\nMai departe."


def _tiny_task(kind, **kw):
    rows = []
    for i in range(30):
        text = " ".join(WORDS[(i * 3 + j) % 8] for j in range(3 + i % 4))
        rows.append({"text": text, "answer": ["A", "B", "A, C"][i % 3], "answers": [WORDS[i % 8]],
                     "summary": WORDS[i % 8] + " " + WORDS[(i + 1) % 8], "score": float(i % 6)})
    data = {"train": rows[:10], "test": rows[10:]}
    template = {"multichoice": "Întrebare: {text}\nA. da\nB. nu\nC. poate\nRăspuns:",
                "qa": "Context: {text}\nÎntrebare: ce?\nRăspuns:",
                "summarization": "Text: {text}\nRezumat:", "regression": "Text: {text}\nScor:"}[kind]
    answer = {"multichoice": lambda r: r["answer"], "qa": lambda r: r["answers"][0],
              "summarization": lambda r: r["summary"], "regression": lambda r: f"{r['score']:.1f}"}[kind]
    return Task("t-" + kind, kind, "", lambda root: data, template, answer,
                ["A", "B", "C"] if kind == "multichoice" else [], **kw), data


@pytest.mark.parametrize("kind,mode", [("multichoice", "loglik"), ("multichoice", "generate"), ("regression", "loglik"),
                                       ("qa", "generate"), ("summarization", "generate")])
def test_every_kind_runs_and_scores_with_its_metric(tmp_path, kind, mode):
    from glotkit.eval.metrics import option_set_scores, rouge_scores
    from glotkit.eval.qa_metrics import aggregate, score_one

    model, tok = build_model(tmp_path, "gemma3", init=0.2)
    task, data = _tiny_task(kind, max_new_tokens=6 if kind in ("qa", "summarization") else None)
    a, b = (run_task(LocalGenerator(model, tok), task, data, shots=1, seed=3, mode=mode, limit=8, batch_size=bs) for bs in (1, 8))
    assert a["predictions"] == b["predictions"] and a["metrics"] == b["metrics"]
    assert a["mode"] == mode and a["main_metric"] in a["metrics"]
    preds, golds = [p["prediction"] for p in a["predictions"]], [p["gold"] for p in a["predictions"]]
    if kind == "multichoice":
        assert a["max_new_tokens"] == 10
        want = option_set_scores([set(p or ()) for p in preds], [set(g) for g in golds], ["A", "B", "C"])
        assert {k: a["metrics"][k] for k in want} == want
        if mode == "loglik":
            assert all(p and 1 <= len(p) <= 2 for p in preds)
    elif kind == "regression":
        assert all(0 <= p <= 5 for p in preds) and len(set(preds)) > 1
    elif kind == "qa":
        want = aggregate([score_one(p, g) for p, g in zip(preds, golds)])
        assert {k: a["metrics"][k] for k in want} == want
    else:
        assert a["metrics"]["rougeL"] == rouge_scores(preds, golds)["rougeL"]


def test_default_max_new_tokens_per_kind():
    assert BUILTIN_TASKS["sentiment"].max_new_tokens == 10 and BUILTIN_TASKS["sts"].max_new_tokens == 10
    assert BUILTIN_TASKS["qa"].max_new_tokens == 250 and BUILTIN_TASKS["summarization"].max_new_tokens == 2048
    assert BUILTIN_TASKS["summarization"].stop == ("\n\n",) and BUILTIN_TASKS["qa"].stop == ("\n",)


def test_summarization_needs_the_users_file(tmp_path):
    task = BUILTIN_TASKS["summarization"]
    with pytest.raises(GlotkitError, match="needs your data: --task-data summarization=FILE"):
        task.load(tmp_path)
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "Un text.", "summary": "Text."}\n{"text": "Altul.", "rezumat": "x"}\n', encoding="utf-8")
    with pytest.raises(GlotkitError, match="record 2: missing or empty field 'summary'"):
        task.load(f)
    f.write_text("".join(f'{{"text": "Textul {i}.", "summary": "T{i}."}}\n' for i in range(20)), encoding="utf-8")
    data = task.load(f)
    assert len(data["train"]) == 4 and len(data["test"]) == 16


def test_user_task_from_yaml(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("propozitie,eticheta\n" + "".join(f"Sibiu e frumos {i},{'da' if i % 2 else 'nu'}\n" for i in range(20)),
                    encoding="utf-8")
    spec = tmp_path / "tasks.yaml"
    spec.write_text("tasks:\n  - name: da-nu\n    kind: classification\n    template: 'Text: {propozitie}\\nRăspuns:'\n"
                    "    answer: eticheta\n    labels: [da, nu]\n    data: {file: rows.csv, shots_pool: 5}\n", encoding="utf-8")
    (task,) = load_task_file(spec)
    data = task.load(tmp_path)
    assert len(data["train"]) == 5 and len(data["test"]) == 15 and task.max_new_tokens == 10
    assert get_tasks(["da-nu", "sentiment"], [task])[0] is task
    model, tok = build_model(tmp_path / "m", "llama")
    r = run_task(LocalGenerator(model, tok), task, data, shots=2, seed=1, mode="loglik", limit=4, batch_size=4)
    assert r["metrics"]["n"] == 4
    spec.write_text("tasks:\n  - name: x\n    kind: classification\n    template: 'T'\n    answer: a\n"
                    "    labels: [a]\n    data: {file: rows.csv}\n    temperatura: 1\n", encoding="utf-8")
    with pytest.raises(GlotkitError, match="unknown key 'temperatura'"):
        load_task_file(spec)
    spec.write_text("tasks:\n  - name: x\n    kind: ranking\n    template: 'T'\n    answer: a\n    data: {file: rows.csv}\n",
                    encoding="utf-8")
    with pytest.raises(GlotkitError, match="unknown kind 'ranking'"):
        load_task_file(spec)


def test_suite_resumes_and_tabulates_models_side_by_side(tmp_path, monkeypatch):
    import json

    import glotkit.eval.suite as suite

    model, tok = build_model(tmp_path / "m", "llama")
    task, data = _toy_task()
    kw = dict(shots=[0, 1], seed=2, mode="loglik", limit=4, batch_size=4, data_root=tmp_path, out_dir=tmp_path / "out",
              log=lambda m: None, progress=False)
    run_suite(LocalGenerator(model, tok), [task], model_label="base", **kw)
    run_suite(LocalGenerator(model, tok), [task], model_label="tuned", **kw)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["model"], r["shots"]) for r in results] == [("base", 0), ("base", 1), ("tuned", 0), ("tuned", 1)]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| task | shots | mode | metric | base | tuned | Δ | n |" in table and "| toy | 1 | loglik | macro_f1 |" in table
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    assert (tmp_path / "out" / "predictions-tuned-toy-1shot.jsonl").is_file()

    def boom(*a, **k):
        raise AssertionError("a finished unit was run again")

    monkeypatch.setattr(suite, "run_task", boom)
    run_suite(LocalGenerator(model, tok), [task], model_label="tuned", **kw)  # nothing left to do


def test_a_template_ending_in_a_space_scores_no_doubled_space(tmp_path):
    """lm-evaluation-harness moves a context's trailing spaces into the continuation; so do we:
    "Răspuns: " scores " pozitivă" after "Răspuns:", exactly as the template without the space."""
    from glotkit.eval.suite import split_continuation

    assert split_continuation("Răspuns: ", "da") == ("Răspuns:", " da")
    assert split_continuation("Răspuns:", "da") == ("Răspuns:", " da")
    assert split_continuation("Răspuns:\n", "da") == ("Răspuns:", "\nda")
    model, tok = build_model(tmp_path, "gemma3", init=0.2)
    task, data = _toy_task()
    spaced = Task("toy", "classification", "toy", lambda root: data, task.template + " ", task.answer, task.labels)
    a = run_task(LocalGenerator(model, tok), task, data, shots=2, seed=7, mode="loglik", limit=6, batch_size=4)
    b = run_task(LocalGenerator(model, tok), spaced, data, shots=2, seed=7, mode="loglik", limit=6, batch_size=4)
    assert [p["option_logliks"] for p in a["predictions"]] == [p["option_logliks"] for p in b["predictions"]]
    prompt = build_prompt(spaced, data["test"][0], data["train"][:2])
    assert "  " not in prompt and prompt == build_prompt(task, data["test"][0], data["train"][:2]) + " "
    # each item records every option's log-likelihood; the choice is the highest
    for p in a["predictions"]:
        best = max(range(2), key=p["option_logliks"].__getitem__)
        assert p["prediction"] == task.labels[best] and a["options"] == task.labels


def test_every_score_has_an_interval_and_a_second_model_a_paired_difference(tmp_path):
    import json

    model, tok = build_model(tmp_path / "m", "llama", init=0.2)
    other, _ = build_model(tmp_path / "o", "llama", init=0.2, seed=1)
    task, data = _toy_task()
    kw = dict(shots=[0, 2], seed=2, mode="loglik", limit=16, batch_size=4, data_root=tmp_path, out_dir=tmp_path / "out",
              log=lambda m: None, progress=False)
    run_suite(LocalGenerator(model, tok), [task], model_label="base", shot_seeds=[5, 6], **kw)
    run_suite(LocalGenerator(other, tok), [task], model_label="tuned", shot_seeds=[5, 6], **kw)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for r in results:
        m = r["metrics"]
        for name in ("accuracy", "macro_f1"):
            lo, hi = m[name + "_ci"]
            assert lo <= m[name] <= hi
        assert "percentile bootstrap over items" in r["ci_method"]
    k2 = [r for r in results if r["shots"] == 2]
    assert all(r["shot_seeds"]["seeds"] == [2, 5, 6] and len(r["shot_seeds"]["values"]) == 3 for r in k2)
    assert all("shot_seeds" not in r for r in results if r["shots"] == 0)
    tuned = [r for r in results if r["model"] == "tuned"]
    for r in tuned:
        base = next(b for b in results if b["model"] == "base" and b["shots"] == r["shots"])
        d = r["paired"]["metrics"]["accuracy"]
        assert r["paired"]["against"] == "base"
        assert d["difference"] == pytest.approx(r["metrics"]["accuracy"] - base["metrics"]["accuracy"], abs=0.01)
        assert d["significant"] == (d["ci"][0] > 0 or d["ci"][1] < 0)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "(seeds " in table and "paired bootstrap" in table
    # the same model twice: a difference of exactly zero, never significant
    run_suite(LocalGenerator(model, tok), [task], model_label="same", **{**kw, "out_dir": tmp_path / "o2"})
    run_suite(LocalGenerator(model, tok), [task], model_label="again", **{**kw, "out_dir": tmp_path / "o2"})
    again = [r for r in json.loads((tmp_path / "o2" / "results.json").read_text()) if r["model"] == "again"]
    assert all(r["paired"]["metrics"]["macro_f1"] == {"difference": 0.0, "ci": [0.0, 0.0], "significant": False}
               for r in again)
