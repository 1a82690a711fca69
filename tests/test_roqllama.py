"""The RoQLlama chain in one recipe: continued pretraining -> task suite (base and adapted) ->
memory table -> one report; resumable stage by stage."""

from __future__ import annotations

import json

from glotkit.cli import main


def _recipe(tmp_path, tiny_llama, **suite):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(10):
        (corpus / f"d{i}.txt").write_text(f"Documentul {i}: Sibiu e pe Cibin, Iaşi e în Moldova. " * 4, encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"Sibiu {i}", "label": "da" if i % 2 else "nu"}) + "\n" for i in range(24)),
                    encoding="utf-8")
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n  - name: da-nu\n    kind: classification\n    template: 'Text: {text}\\nRăspuns:'\n"
        "    answer: label\n    labels: [da, nu]\n    data: {file: rows.jsonl, shots_pool: 6}\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "roq", "task": "pretrain", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_llama)},
        "pretrain": {"corpus": str(corpus), "block_size": 64, "heldout_ratio": 0.2},
        "lora": {"r": 4, "alpha": 4, "target_modules": "all-linear"},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2},
        "suite": {"tasks": ["da-nu"], "task_files": ["tasks.yaml"], "shots": [0, 2], "limit": 6, **suite},
        "memory": {"modes": ["fp32"], "prompt_tokens": 32, "new_tokens": 2},
        "stages": ["eval_base", "train", "eval_tuned", "suite", "memory", "report"]}), encoding="utf-8")
    return recipe


def test_cpt_then_suite_then_memory_into_one_report(tmp_path, tiny_llama, capsys):
    recipe = _recipe(tmp_path, tiny_llama)
    assert main(["pretrain", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "roq"
    results = json.loads((run / "suite" / "results.json").read_text())
    labels = [r["model"] for r in results]
    assert len(results) == 4 and labels[0].endswith("(base)") and labels[-1].endswith("roq adapter")
    mem = json.loads((run / "memory.json").read_text())
    assert mem["rows"][0]["mode"] == "fp32" and "error" not in mem["rows"][0]
    assert mem["trim_vocab_to"] == json.loads((run / "corpus.json").read_text())["distinct_token_ids"] > 0
    assert mem["training"]["estimate_mb"] > mem["training"]["weights_mb"] > 0
    report = (run / "report.md").read_text()
    for part in ("## Held-out text", "## Task suite (base vs adapted)", "| da-nu | 2 | loglik | macro_f1 |",
                 "## Memory", "est. 8-bit embedding", "vocab trimmed to"):
        assert part in report, part
    capsys.readouterr()
    # everything done: a rerun loads nothing and redoes nothing
    assert main(["run", "--no-progress", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "task suite:" not in err and "memory:" not in err


def test_suite_stage_errors(tmp_path, tiny_llama, capsys):
    recipe = _recipe(tmp_path, tiny_llama, tasks=["sentimnt"])
    assert main(["run", "--no-progress", str(recipe)]) == 2
    assert "unknown task 'sentimnt' (available: sentiment, nli, emotion" in capsys.readouterr().err
    recipe = _recipe(tmp_path, tiny_llama, shots=[0, 7])
    assert main(["run", "--no-progress", str(recipe)]) == 2
    assert "k=7 is larger than the task's train split (6 examples)" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "tasks.yaml")]) == 2  # not a recipe: unknown key 'tasks'
    assert "unknown recipe key 'tasks'" in capsys.readouterr().err


def test_eval_cli_errors(tmp_path, capsys):
    assert main(["eval", "--tasks", "sentiment", "--task-data", "summarization=x.jsonl"]) == 2
    assert "task data for 'summarization': that task is not being run" in capsys.readouterr().err
    assert main(["eval", "--tasks", "summarization", "--task-data", "summarization=missing.jsonl"]) == 2
    assert "missing.jsonl: data file of task 'summarization' not found" in capsys.readouterr().err
    assert main(["eval", "--compare-base"]) == 2
    assert "--compare-base: needs --adapter" in capsys.readouterr().err
    assert main(["eval", "--shots", "0,x"]) == 2
    assert "expected numbers like 0,1,3,5" in capsys.readouterr().err
