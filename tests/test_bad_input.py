"""Bad input: one line naming the file/field/value, exit status 2, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glotkit.cli import main
from glotkit.errors import GlotkitError
from glotkit.systems import load_recipe


def _recipe(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(body, encoding="utf-8")
    return p


def _run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [s for s in err.splitlines() if s.startswith("glotkit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_recipe_file(tmp_path, capsys):
    code, err = _run_cli(capsys, "validate", str(tmp_path / "nope.yaml"))
    _assert_one_line(code, err, "nope.yaml", "not found")


def test_unknown_key_suggests_closest(tmp_path, capsys):
    p = _recipe(tmp_path, "lora:\n  rank: 4\n")
    code, err = _run_cli(capsys, "validate", str(p))
    _assert_one_line(code, err, "lora.rank", "did you mean 'lora.r'")
    p = _recipe(tmp_path, "trian:\n  lr: 0.1\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "'trian'", "did you mean 'train'")


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "'eight'"])
def test_rank_must_be_positive_integer(tmp_path, capsys, value):
    p = _recipe(tmp_path, f"lora:\n  r: {value}\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "lora.r")


def test_override_errors(tmp_path, capsys):
    p = _recipe(tmp_path, "name: x\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p), "--set", "lora.r=0"), "lora.r", "0")
    _assert_one_line(*_run_cli(capsys, "validate", str(p), "--set", "lora.r"), "key=value")
    r = load_recipe(p, ["lora.alpha=4r", "lora.r=4", "lora.target_modules=q_proj,v_proj"])
    assert r.lora.resolved_alpha() == 16.0 and r.lora.target_modules == ["q_proj", "v_proj"]


def test_invalid_yaml(tmp_path, capsys):
    p = _recipe(tmp_path, "lora: [unclosed\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "not valid YAML")


def _run_recipe_cli(tmp_path, capsys, model_dir, data: dict, **extra) -> tuple[int, str]:
    raw = {"name": "bad", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model_dir)}, "data": data,
           "train": {"max_steps": 1}, "eval": {"max_new_tokens": 2}}
    raw.update(extra)
    p = tmp_path / "bad.yaml"
    p.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return _run_cli(capsys, "run", "--no-progress", str(p))


def test_missing_data_file(tmp_path, capsys, tiny_llama):
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(tmp_path / "missing.jsonl")})
    _assert_one_line(code, err, "missing.jsonl", "not found")
    assert not (tmp_path / "runs" / "bad").exists()  # nothing written


def test_wrong_column(tmp_path, capsys, tiny_llama):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"context": "c", "query": "q?", "answer": "c"}) + "\n", encoding="utf-8")
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(f), "test": str(f)})
    _assert_one_line(code, err, "d.jsonl: line 1", "missing field 'question'", "query", "data.question_field")


def test_wrong_csv_column(tmp_path, capsys, tiny_llama):
    f = tmp_path / "d.csv"
    f.write_text("ctx,question,answer\nSibiu e pe Cibin,Pe ce rau?,Cibin\n", encoding="utf-8")
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(f), "test": str(f)})
    _assert_one_line(code, err, "d.csv: line 2", "'context'")


def test_empty_data(tmp_path, capsys, tiny_llama):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n", encoding="utf-8")
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(f)})
    _assert_one_line(code, err, "empty.jsonl", "no examples")


def test_bad_json_line(tmp_path, capsys, tiny_llama):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"context": "a", "question": "b", "answer": "a"}) + "\n{oops\n", encoding="utf-8")
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(f), "test": str(f)})
    _assert_one_line(code, err, "line 2", "not valid JSON")


def test_unknown_target_module_lists_layers(tmp_path, capsys, tiny_llama, qa_files):
    train, test = qa_files
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(train), "test": str(test)},
                                lora={"target_modules": ["q_proj", "query"]}, stages=["train"])
    _assert_one_line(code, err, "lora.target_modules", "'query'", "q_proj", "down_proj")
    assert not (tmp_path / "runs" / "bad" / "adapter").exists()


def test_model_folder_without_config(tmp_path, capsys, qa_files):
    train, test = qa_files
    (tmp_path / "notamodel").mkdir()
    code, err = _run_recipe_cli(tmp_path, capsys, tmp_path / "notamodel", {"train": str(train), "test": str(test)})
    _assert_one_line(code, err, "notamodel", "config.json")


def test_answers_not_in_context_warns_with_count(tmp_path, capsys, tiny_llama):
    f = tmp_path / "d.jsonl"
    rows = [{"context": f"Sibiu e pe Cibin {i}", "question": "Pe ce râu?", "answer": "Cibin" if i % 3 else "Mureș"}
            for i in range(9)]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(f), "test": str(f)}, stages=["eval_base"])
    assert code == 0, err
    assert "3 of 9 answers do not occur in their context" in err


def test_too_long_prompts_are_counted(tmp_path, capsys, tiny_llama):
    f = tmp_path / "d.jsonl"
    rows = [{"context": ("Munții Carpați. " * (60 if i < 2 else 1)) + "Sibiu e pe Cibin.", "question": "Pe ce râu?",
             "answer": "Cibin"} for i in range(6)]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, {"train": str(f), "test": str(f)},
                                stages=["train"], train={"max_steps": 1, "max_length": 64})
    assert code == 0, err
    assert "2 were dropped" in err and "train.max_length=64" in err


def test_rerun_with_different_recipe_is_refused(tmp_path, capsys, tiny_llama, qa_files):
    train, test = qa_files
    data = {"train": str(train), "test": str(test)}
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, data, stages=["eval_base"])
    assert code == 0, err
    code, err = _run_recipe_cli(tmp_path, capsys, tiny_llama, data, stages=["eval_base"], lora={"r": 2})
    _assert_one_line(code, err, "config.yaml", "lora.r: 8 -> 2", "--set name=")


def test_split_ratio_too_coarse(tmp_path):
    from glotkit.data.qa import QAExample, split_by_context

    exs = [QAExample(str(i), "same context", "q", ["a"]) for i in range(5)]
    with pytest.raises(GlotkitError, match="distinct contexts"):
        split_by_context(exs, 0.2, 0)


# --------------------------------------------------------------------------- issue 16


def test_recipe_bytes_duplicate_keys_and_languages(tmp_path, capsys):
    p = _recipe(tmp_path, "name: a\nlora:\n  r: 4\n  alpha: 8\n  r: 16\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "r.yaml: line 5: key 'r' is given twice (first on line 3)")
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "r.yaml", "not a text file in UTF-8")
    p.write_bytes(b"name: a\n\x00\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "r.yaml: line 2: NUL byte")
    p.write_bytes("\ufeffname: bom\n".encode())  # a BOM written by a Windows editor is fine
    assert load_recipe(p).name == "bom"
    p = _recipe(tmp_path, "data:\n  language: Romanian\n")
    assert load_recipe(p).data.language == "ro"  # the common name maps to the code
    assert load_recipe(p, ["data.language=ro-RO"]).data.language == "ro-RO"
    _assert_one_line(*_run_cli(capsys, "validate", str(p), "--set", "data.language=Klingonese"),
                     "data.language", "'Klingonese' is not a language code")
    pre = _recipe(tmp_path, "system: pretrain\npretrain:\n  language: German\n")
    assert load_recipe(pre).pretrain.language == "de"


def test_eval_out_is_a_file_a_locked_folder_or_needs_a_missing_client(tmp_path, capsys, monkeypatch):
    import importlib.util
    import os
    import subprocess
    import sys

    f = tmp_path / "out.txt"
    f.write_text("x")
    args = ["eval", "--model", "no-such-model-anywhere/x", "--tasks", "sentiment", "--data-root", str(tmp_path)]
    code, err = _run_cli(capsys, *args, "--out", str(f))
    if "sentiment" in err and "out.txt" not in err:
        pytest.skip("the task's data is checked first here")
    _assert_one_line(code, err, "--out", "is a file")
    held = tmp_path / "held"
    held.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (held / ".eval.lock").write_text(json.dumps({"pid": holder.pid, "command": "glotkit eval", "since": "now"}))
        from glotkit.systems.runner import owned

        with pytest.raises(GlotkitError, match=f"in use by process {holder.pid}"):
            with owned(held, "glotkit eval", lock_name=".eval.lock"):
                pass
    finally:
        holder.kill()
        holder.wait()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    code, err = _run_cli(capsys, "eval", "--model", "no-such-model/x", "--tasks", "qa", "--base-url",
                         "http://127.0.0.1:9/v1", "--served-model", "m", "--out", str(tmp_path / "o"))
    if code == 2 and "qa" in err and "openai" not in err:
        pytest.skip("the task's data is checked first here")
    _assert_one_line(code, err, "--base-url", "openai client", "glotkit[server]")
    assert os.path.isdir(tmp_path) and not (tmp_path / "o").exists()


def test_a_server_that_never_answers_is_bounded_and_named(tmp_path):
    import socket
    import threading

    from glotkit.config import GenerateSection
    from glotkit.generate.server import ServerGenerator

    pytest.importorskip("openai")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never answers
    kept: list = []
    stop = threading.Event()

    def accept():
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                kept.append(silent.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    said: list[str] = []
    try:
        cfg = GenerateSection(backend="openai", base_url=url, models={"base": "m"}, timeout=1.0, retries=0)
        with pytest.raises(GlotkitError, match=rf"no answer from {url} after 1 try \(APITimeoutError") as err:
            ServerGenerator.connect(cfg, "base", said.append, "task suite")
        assert "\n" not in str(err.value)
        assert said == [f"task suite: asking {url} for its models (each request waits up to 1 s, 1 try)"]
    finally:
        stop.set()
        t.join()
        for c in kept:
            c.close()
        silent.close()


def test_templates_are_checked_when_the_recipe_is_validated(tmp_path, capsys):
    p = _recipe(tmp_path, "prompt:\n  template: 'Topic: {topic}\\nQuestion: {question}\\nAnswer:'\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "prompt.template", "unknown placeholder {topic}",
                     "{context}, {question}")
    p = _recipe(tmp_path, "prompt:\n  template: 'Q {question} {'\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "prompt.template", "Single '{'", "'{{'")
    p = _recipe(tmp_path, "prompt:\n  target: ' {answer.upper}'\n")
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "prompt.target", "{answer.upper} is not a field name")
    p = _recipe(tmp_path, "prompt:\n  template: 'Q {question} {{literal}}'\n")
    assert load_recipe(p).prompt.template.endswith("{{literal}}")  # doubled braces are text


@pytest.mark.parametrize("name, template, needle", [
    ("x/../../escape", "{text}", "name: must be a plain folder name"),
    ("..", "{text}", "name: must be a plain folder name"),
    ("ok", "Text: {text} {", "template: Single '{'"),
    ("ok", "Text: {0}", "template: placeholder {0} is not a field name"),
])
def test_task_file_names_and_templates(tmp_path, capsys, name, template, needle):
    from glotkit.eval.suite import load_task_file

    (tmp_path / "rows.jsonl").write_text('{"text": "a", "label": "x"}\n', encoding="utf-8")
    spec = tmp_path / "tasks.yaml"
    spec.write_text(json.dumps({"tasks": [{"name": name, "kind": "classification", "labels": ["x"],
                                           "template": template, "answer": "label",
                                           "data": {"file": "rows.jsonl"}}]}), encoding="utf-8")
    with pytest.raises(GlotkitError) as err:
        load_task_file(spec)
    assert needle in str(err.value) and "\n" not in str(err.value), err.value


def test_sweep_trials_that_would_share_a_folder(tmp_path):
    from glotkit.sweep import trial_recipes

    r = load_recipe(_recipe(tmp_path, "name: s\n"))
    with pytest.raises(GlotkitError, match=r"would share the folder 's--revision=a_b'"):
        trial_recipes(r, {"model.revision": ["a/b", "a b"]})
    with pytest.raises(GlotkitError, match="sweep: name: cannot be swept"):
        trial_recipes(r, {"name": ["a", "b"]})


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    from glotkit.io import atomic_write_text

    target = tmp_path / "metrics.json"
    target.write_text("old", encoding="utf-8")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_xllora_language_check_must_be_one_the_check_knows(tmp_path, capsys):
    p = _recipe(tmp_path, "system: xllora\nsynth:\n  language_check: English\n")
    assert load_recipe(p).synth.language_check == "en"  # a name maps to its code
    p = _recipe(tmp_path, "system: xllora\nsynth:\n  language_check: ja\n")  # would drop every output
    _assert_one_line(*_run_cli(capsys, "validate", str(p)), "synth.language_check", "knows en, ro")


@pytest.mark.parametrize("argv, needle", [
    (["--prompt-tokens", "-5"], "--prompt-tokens -5: must be a positive number"),
    (["--new-tokens", "0"], "--new-tokens 0: must be a positive number"),
    (["--modes", ","], "--modes: no mode given"),
    (["--json", "."], "--json .: is a folder"),
])
def test_memory_arguments_are_checked_before_any_model_loads(capsys, argv, needle):
    _assert_one_line(*_run_cli(capsys, "memory", "--model", "no-model-needed", *argv), needle)
