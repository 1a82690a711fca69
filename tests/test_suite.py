"""The task suite: batch-size invariance, seeded shots, log-likelihood scoring, errors, loaders."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED, build_model
from glotkit.errors import GlotkitError
from glotkit.eval.suite import (BUILTIN_TASKS, Task, build_prompt, draw_shots, get_tasks, option_logliks,
                                parse_label, parse_number, run_task)

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
    runs = [run_task(model, tok, task, data, shots=2, seed=7, mode=mode, limit=12, batch_size=b) for b in (1, 8)]
    assert [p["prediction"] for p in runs[0]["predictions"]] == [p["prediction"] for p in runs[1]["predictions"]]
    if mode == "generate":
        assert [p["generation"] for p in runs[0]["predictions"]] == [p["generation"] for p in runs[1]["predictions"]]
    assert runs[0]["mode"] == mode and runs[0]["metrics"] == runs[1]["metrics"]


def test_loglik_equals_direct_computation(tmp_path):
    model, tok = build_model(tmp_path, "llama")
    model.eval()
    prompts = [tok("Recenzie: Sibiu Cibin\nRăspuns:")["input_ids"], tok("Recenzie: Iași\nRăspuns:")["input_ids"]]
    options = [tok(" pozitivă", add_special_tokens=False)["input_ids"], tok(" negativă", add_special_tokens=False)["input_ids"]]
    got = option_logliks(model, tok, prompts, options, batch_size=3)
    for i, p in enumerate(prompts):
        for j, o in enumerate(options):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + o])).logits[0].float(), -1)
            want = sum(logp[len(p) - 1 + t, o[t]].item() for t in range(len(o)))
            assert got[i][j] == pytest.approx(want, abs=1e-4)


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
        run_task(model, tok, bad, data, shots=0, seed=0, mode="generate", limit=2, batch_size=2)


def test_parsers():
    assert parse_label(" Negativă, clar.", ["pozitivă", "negativă"]) == "negativă"
    assert parse_label(" nu știu", ["pozitivă", "negativă"]) is None
    assert parse_number(" 3,5 din 5") == 3.5 and parse_number(" n/a") is None


@pytest.mark.integration
@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_builtin_loaders(name):
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data not present")
    task = BUILTIN_TASKS[name]
    data = task.load(SHARED / "data")
    assert len(data["test"]) >= 500 and len(data["train"]) >= 5
    assert task.fields() <= set(data["test"][0])
    if task.kind == "classification":
        assert {task.answer(r) for r in data["test"]} <= set(task.labels)
