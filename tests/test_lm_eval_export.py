"""Exported tasks run through lm-evaluation-harness give glotkit's prompts, option log-likelihoods
and choices (lm-eval is an optional test dependency: the test is skipped without it)."""

from __future__ import annotations

import json

import pytest

from conftest import build_model
from glotkit.eval import suite
from glotkit.eval.suite import Task, build_prompt, draw_shots, run_task
from glotkit.generate.local import LocalGenerator

WORDS = ["Sibiu", "Cibin", "Iași", "Mureș", "Brașov", "Dunăre", "Carpați", "Cluj"]


def _tasks():
    rows = [{"text": " ".join(WORDS[(i * 3 + j) % 8] for j in range(3 + i % 5)), "label": ["pozitivă", "negativă"][i % 2],
             "answer": ["A", "B", "A, C", "C"][i % 4]} for i in range(40)]
    data = {"train": rows[:20], "test": rows[20:]}
    cls = Task("toy-cls", "classification", "", lambda root: data, "Recenzie: {text}\nRăspuns:", lambda r: r["label"],
               ["pozitivă", "negativă"])
    # a template that ends in a space: no doubled space in either tool
    mcq = Task("toy-mcq", "multichoice", "", lambda root: data, "Întrebare: {text}\nA. da\nB. nu\nC. poate\nRăspuns: ",
               lambda r: r["answer"], ["A", "B", "C"])
    return [cls, mcq], data


def test_exported_tasks_give_glotkits_logliks_and_choices_in_lm_eval(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'glotkit[lmeval]')")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from glotkit.eval.lm_eval_export import export_tasks, lm_eval_logliks

    model, tok = build_model(tmp_path / "m", "llama", init=0.2)
    model.eval()
    tasks, data = _tasks()
    seed, k, limit = 7, 2, 8
    names = export_tasks(tasks, shots=[k], seed=seed, limit=limit, data_root=tmp_path, task_data={}, out_dir=tmp_path / "x")
    assert names == ["glotkit_toy_cls_2shot", "glotkit_toy_mcq_2shot"]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "x")),
                                  log_samples=True)
    for task, name in zip(tasks, names):
        ours = run_task(LocalGenerator(model, tok), task, data, shots=k, seed=seed, mode="loglik", limit=limit, batch_size=4)
        samples = res["samples"][name]
        theirs = lm_eval_logliks(samples)
        assert sorted(theirs) == list(range(limit))
        test = suite.test_items(task, data, limit)
        for s in samples:
            i = s["doc"]["glotkit_index"]
            # the same demonstrations and query; lm-eval's context is glotkit's prompt
            prompt = build_prompt(task, test[i], draw_shots(data["train"], k, seed, i))
            context, continuation = s["arguments"][0][0], s["arguments"][0][1]
            assert context == prompt
            assert "  " not in context + continuation
        for i, p in enumerate(ours["predictions"]):
            assert p["option_logliks"] == pytest.approx(theirs[i], abs=1e-4)
            options = ours["options"]
            assert options[max(range(len(options)), key=theirs[i].__getitem__)] == \
                options[max(range(len(options)), key=p["option_logliks"].__getitem__)]
        acc = res["results"][name]["acc,none"]
        golds = [s["doc"]["glotkit_gold"] for s in sorted(samples, key=lambda s: s["doc"]["glotkit_index"])]
        choices = [max(range(len(ours["options"])), key=p["option_logliks"].__getitem__) for p in ours["predictions"]]
        assert acc == pytest.approx(sum(c == g for c, g in zip(choices, golds)) / limit)


def test_export_writes_portable_tasks_and_the_cli_stops_before_any_model(tmp_path, capsys):
    from glotkit.cli import main
    from glotkit.eval.lm_eval_export import export_tasks

    tasks, data = _tasks()
    export_tasks(tasks, shots=[0, 3], seed=1, limit=None, data_root=tmp_path, task_data={}, out_dir=tmp_path / "x")
    files = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert files == ["README.md", "glotkit_lm_eval.py", "glotkit_toy_cls_0shot.yaml", "glotkit_toy_cls_3shot.yaml",
                     "glotkit_toy_mcq_0shot.yaml", "glotkit_toy_mcq_3shot.yaml", "toy-cls", "toy-mcq"]
    text = (tmp_path / "x" / "glotkit_toy_mcq_3shot.yaml").read_text()
    assert "custom_dataset: !function glotkit_lm_eval.load" in text and "num_fewshot: 3" in text
    assert "target_delimiter: ''" in text  # the template ends in a space
    assert str(tmp_path) not in text + (tmp_path / "x" / "glotkit_lm_eval.py").read_text()  # no absolute paths
    test = [json.loads(line) for line in (tmp_path / "x" / "toy-mcq" / "test.jsonl").read_text().splitlines()]
    assert len(test) == 20 and [r["glotkit_index"] for r in test] == list(range(20))
    assert all(r["glotkit_choices"][r["glotkit_gold"]].replace(" ", "").split(",") == r["answer"].replace(" ", "").split(",")
               for r in test)
    spec = tmp_path / "tasks.yaml"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"t": f"Sibiu {i}", "y": "da" if i % 2 else "nu"}) + "\n" for i in range(20)))
    spec.write_text("tasks:\n  - name: da-nu\n    kind: classification\n    template: 'Text: {t}\\nRăspuns:'\n"
                    "    answer: y\n    labels: [da, nu]\n    data: {file: rows.jsonl, shots_pool: 5}\n", encoding="utf-8")
    assert main(["eval", "--model", "no-such-model", "--task-file", str(spec), "--tasks", "da-nu", "--shots", "0,2",
                 "--export-lm-eval", str(tmp_path / "y")]) == 0
    assert "glotkit_da_nu_2shot" in capsys.readouterr().out
    assert len((tmp_path / "y" / "da-nu" / "test.jsonl").read_text().splitlines()) == 15
