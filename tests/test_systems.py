"""Systems as parts: a new system is one module that registers itself; the runner skips finished
stages, redoes stale ones (outputs moved aside), lets one process own a run folder; sweeps and
the CLI work for any registered system."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import yaml
from pydantic import Field

from conftest import write_qa_jsonl
from glotkit.cli import main
from glotkit.config import RecipeBase, _Section
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json
from glotkit.systems import get_system, load_recipe, register, systems, validate_recipe
from glotkit.systems.base import Run, RunFolder, Stage, Verb
from glotkit.systems.runner import owned, run_recipe

# --------------------------------------------------------------------------- a tiny system, whole


class CountSection(_Section):
    text: str | None = None  # a text file: its words are counted
    scale: int = 1


class CountRecipe(RecipeBase):
    system: Literal["count"] = "count"
    count: CountSection = Field(default_factory=CountSection)

    default_stages: ClassVar[tuple[str, ...]] = ("tally", "report")
    all_stages: ClassVar[tuple[str, ...]] = ("tally", "report")
    path_keys: ClassVar[tuple[tuple[str, str], ...]] = (("count", "text"),)


class CountFolder(RunFolder):
    tally = property(lambda self: self.root / "tally.json")


def _tally(run: Run) -> None:
    if run.recipe.count.scale == 0:  # a failure inside a stage, after the run folder exists
        raise GlotkitError("count.scale: 0 counts nothing")
    words = Path(run.recipe.count.text).read_text(encoding="utf-8").split()
    run.shared.setdefault("calls", []).append("tally")
    atomic_write_json(run.folder.tally, {"words": len(words) * run.recipe.count.scale})


def _report(run: Run) -> None:
    run.folder.report.write_text(f"{run.folder.read_json(run.folder.tally)['words']} words\n", encoding="utf-8")


class CountSystem:
    name = "count"
    title = "word counts"
    schema = CountRecipe
    folder_type = CountFolder
    verbs = (Verb("tally", "count the words of a recipe's text", stages=("tally",)),
             Verb("train", "nothing to train: the tally", stages=("tally",)))
    result_neutral = ()
    redone_by_settings = ()
    multi_process = False

    def stages(self, recipe: CountRecipe) -> list[Stage]:
        return [Stage("tally", _tally, done=lambda run: run.folder.tally.is_file(),
                      inputs=lambda run: [run.recipe.count.text], outputs=lambda run: [run.folder.tally]),
                Stage("report", _report)]

    def check(self, recipe: CountRecipe, folder: CountFolder, log) -> None:
        if not recipe.count.text or not Path(recipe.count.text).is_file():
            raise GlotkitError(f"count.text: {recipe.count.text}: file not found")

    def describe(self, run: Run) -> str:
        return "counting words"

    def summary(self, folder: CountFolder) -> dict[str, Any]:
        tally = folder.read_json(folder.tally)
        return {"words": tally["words"]} if tally else {}


@pytest.fixture
def count_system():
    register(CountSystem())
    yield
    from glotkit.systems import _SYSTEMS

    _SYSTEMS.pop("count", None)


def _count_recipe(tmp_path: Path, text: str = "a b c", **count) -> Path:
    (tmp_path / "words.txt").write_text(text, encoding="utf-8")
    p = tmp_path / "count.yaml"
    p.write_text(yaml.safe_dump({"system": "count", "name": "c", "runs_dir": str(tmp_path / "runs"),
                                 "count": {"text": "words.txt", **count}}), encoding="utf-8")
    return p


def test_a_new_system_registers_and_runs_through_the_runner(tmp_path, count_system, capsys):
    recipe = _count_recipe(tmp_path, "one two three")
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "c"
    assert json.loads((run / "tally.json").read_text()) == {"words": 3}
    assert (run / "report.md").read_text() == "3 words\n"
    assert "counting words" in capsys.readouterr().err
    # its own CLI verb, its schema in `glotkit validate`, only its sections
    assert main(["tally", str(recipe)]) == 0
    assert main(["validate", str(recipe)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["system"] == "count" and "count" in shown and "data" not in shown and "distill" not in shown
    # a section of another system is named as such
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"system": "count", "synth": {"anchors": "x"}}), encoding="utf-8")
    assert main(["validate", str(bad)]) == 2
    assert "'synth' is a section of system 'xllora', not of this recipe's" in capsys.readouterr().err
    # a verb of another system is refused with one line naming it
    assert main(["distill", "compare", str(recipe)]) == 2
    assert "system is 'count'; 'glotkit distill' needs system: distill" in capsys.readouterr().err


def test_finished_stages_are_skipped_and_stale_ones_redone(tmp_path, count_system, capsys):
    recipe = load_recipe(_count_recipe(tmp_path, "one two three"))
    run_recipe(recipe, log=lambda m: None)
    folder = recipe.run_dir()
    mtime = (folder / "tally.json").stat().st_mtime_ns
    run_recipe(recipe, log=lambda m: None)  # nothing changed: tally skipped
    assert (folder / "tally.json").stat().st_mtime_ns == mtime
    (tmp_path / "words.txt").write_text("one two three four", encoding="utf-8")  # the input changed
    logs: list[str] = []
    run_recipe(recipe, log=logs.append)
    assert json.loads((folder / "tally.json").read_text()) == {"words": 4}
    assert json.loads((folder / "tally.json.previous-1").read_text()) == {"words": 3}  # moved aside, not deleted
    assert any("stage tally was made from other inputs" in m and "words.txt" in m for m in logs)


def test_one_process_owns_a_run_folder(tmp_path, count_system, capsys):
    path = _count_recipe(tmp_path)
    recipe = load_recipe(path)
    folder = recipe.run_dir()
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".lock").write_text(json.dumps({"pid": holder.pid, "command": "glotkit run", "since": "now"}))
        with pytest.raises(GlotkitError, match=rf"in use by process {holder.pid} \(glotkit run, since now\)"):
            run_recipe(recipe, log=lambda m: None)
        assert main(["run", "--no-progress", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"glotkit: error: {folder}: in use by process {holder.pid} (glotkit run, since now); wait for it "
                       "to end or stop it"]
        assert not (folder / "tally.json").exists()
    finally:
        holder.kill()
        holder.wait()
    run_recipe(recipe, log=lambda m: None)  # the holder is gone: its lock is taken over
    assert (folder / "tally.json").is_file() and not (folder / ".lock").exists()
    with owned(folder, "test"):  # the lock names its process and goes with it
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    assert not (folder / ".lock").exists()


def test_sweep_tabulates_any_systems_summary(tmp_path, count_system, capsys):
    recipe = _count_recipe(tmp_path, "a b c d e")
    assert main(["sweep", "--no-progress", str(recipe), "--grid", "count.scale=1,3"]) == 0
    sweep = tmp_path / "runs" / "c-sweep"
    table = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [(r["count.scale"], r["status"], r["words"]) for r in table] == [("1", "ok", "5"), ("3", "ok", "15")]
    assert "| count.scale | words | status |" in (sweep / "sweep.md").read_text()
    assert (sweep / "words_vs_scale.png").is_file()


# --------------------------------------------------------------------------- the built-in systems


def test_builtin_systems_and_task_alias(tmp_path):
    assert list(systems()) == ["qa", "pretrain", "xllora", "distill", "sft"]
    for name, system in systems().items():
        assert system.name == name and system.schema.model_fields["system"].default == name
        assert set(system.schema.default_stages) <= set(system.schema.all_stages)
        assert {s.name for s in system.stages(system.schema())} == set(system.schema.all_stages)
    old = validate_recipe({"task": "xllora"})  # recipes written before `system:` still load
    assert old.system == "xllora" and "task" not in old.to_dict()
    with pytest.raises(GlotkitError, match="system: 'nope' is not a system"):
        validate_recipe({"system": "nope"})
    with pytest.raises(GlotkitError, match="system: 'qa' and task: 'distill' disagree"):
        validate_recipe({"system": "qa", "task": "distill"})
    with pytest.raises(GlotkitError, match="'distill' is a section of system 'distill'"):
        validate_recipe({"system": "qa", "distill": {}})
    assert get_system("qa").schema.model_fields.keys() >= {"data", "prompt", "eval", "suite", "memory"}


def test_shipped_recipes_hold_only_their_systems_sections():
    for path in sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml")):
        recipe = load_recipe(path)
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert set(raw) <= set(type(recipe).model_fields) | {"task"}, path
        assert set(recipe.to_dict()) == set(type(recipe).model_fields), path


def test_summary_of_xllora_and_distill_folders(tmp_path):
    xl = get_system("xllora")
    folder = xl.folder_type(tmp_path / "x")
    assert xl.summary(folder) == {}
    atomic_write_json(folder.embed / "trained.json", {"sts": {"spearman": 61.5, "n": 10}})
    atomic_write_json(folder.embed / "base.json", {"sts": {"spearman": 55.0, "n": 10}})
    assert xl.summary(folder) == {"triplets": None, "sts.spearman": 61.5, "base_sts.spearman": 55.0}
    di = get_system("distill")
    folder = di.folder_type(tmp_path / "d")
    atomic_write_json(folder.evaluate / "table.json", {"rows": [
        {"label": "teacher", "score": 0.5, "languages": {"de": 0.4, "en": 0.6}}]})
    assert di.summary(folder) == {"teacher score": 50.0, "teacher de": 40.0, "teacher en": 60.0}


def test_a_changed_test_file_redoes_the_base_evaluation(tmp_path, tiny_llama, capsys):
    train, test = write_qa_jsonl(tmp_path / "train.jsonl", 8), write_qa_jsonl(tmp_path / "test.jsonl", 3, offset=100)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "t", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_llama)},
                                  "data": {"train": str(train), "test": str(test)},
                                  "eval": {"max_new_tokens": 2, "batch_size": 4}, "stages": ["eval_base"]}))
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "eval_base" / "metrics.json").read_text())["n"] == 3
    write_qa_jsonl(test, 5, offset=200)  # other questions, same file name
    capsys.readouterr()
    assert main(["run", "--no-progress", str(recipe)]) == 0
    assert "stage eval_base was made from other inputs" in capsys.readouterr().err
    assert json.loads((run / "eval_base" / "metrics.json").read_text())["n"] == 5
    assert json.loads((run / "eval_base.previous-1" / "metrics.json").read_text())["n"] == 3
    assert json.loads((run / "metrics.json").read_text())["base"]["n"] == 5


# --------------------------------------------------------------------------- issue 16: runs that cannot go wrong


def test_a_failed_start_is_fixed_by_fixing_the_recipe(tmp_path, count_system, capsys):
    path = _count_recipe(tmp_path, "a b", scale=0)
    assert main(["run", "--no-progress", str(path)]) == 2
    assert "count.scale: 0 counts nothing" in capsys.readouterr().err
    assert (tmp_path / "runs" / "c" / "config.yaml").is_file()  # the folder exists, no stage made anything
    assert main(["run", "--no-progress", str(path), "--set", "count.scale=2"]) == 0
    err = capsys.readouterr().err
    assert "no stage has produced output yet: the run folder takes the new recipe" in err
    assert json.loads((tmp_path / "runs" / "c" / "tally.json").read_text()) == {"words": 4}
    # once a stage has produced output a changed recipe is refused as before
    assert main(["run", "--no-progress", str(path), "--set", "count.scale=3"]) == 2
    assert "made with a different recipe (count.scale: 2 -> 3)" in capsys.readouterr().err


def test_a_setting_added_since_the_run_was_made_is_no_change_at_its_default(tmp_path, count_system, capsys):
    """A run folder made before a setting existed (its config.yaml lacks the key) resumes while the
    new setting keeps its default; set to something else, it is a change like any other."""
    import yaml

    path = _count_recipe(tmp_path, "a b", scale=2)
    assert main(["run", "--no-progress", str(path)]) == 0
    saved = tmp_path / "runs" / "c" / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    del cfg["generate"]["vocab_corpus"]  # as an older glotkit wrote it
    saved.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", "--no-progress", str(path)]) == 0
    assert main(["run", "--no-progress", str(path), "--set", "generate.vocab_corpus=[x.txt]"]) == 2
    assert "made with a different recipe (generate.vocab_corpus" in capsys.readouterr().err


def test_a_moved_run_folder_and_a_read_only_one_rerun_as_no_ops(tmp_path, count_system, capsys, monkeypatch):
    import shutil

    import glotkit.systems.runner as runner

    path = _count_recipe(tmp_path, "a b c")
    assert main(["run", "--no-progress", str(path)]) == 0
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "archive"))  # runs_dir is result-neutral
    moved = tmp_path / "archive" / "c"
    config = (moved / "config.yaml").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in moved.iterdir()}
    calls: list[str] = []
    real_access = os.access  # the folder reads as not writable (chmod does not stop root, who runs CI)
    monkeypatch.setattr(runner.os, "access", lambda p, mode, **k: Path(p) != moved and real_access(p, mode, **k))
    monkeypatch.setattr(sys.modules[__name__], "_tally", lambda run: calls.append("x"))  # must not run
    capsys.readouterr()
    assert main(["run", "--no-progress", str(path), "--set", f"runs_dir={tmp_path / 'archive'}"]) == 0
    assert "every stage is done (the folder is read-only: nothing written)" in capsys.readouterr().err
    assert calls == [] and (moved / "config.yaml").read_bytes() == config
    assert {p.name: p.stat().st_mtime_ns for p in moved.iterdir()} == stamps  # not one file written
    # a read-only folder where a stage still has to run: one line saying so
    (moved / "tally.json").unlink()
    assert main(["run", "--no-progress", str(path), "--set", f"runs_dir={tmp_path / 'archive'}"]) == 2
    assert "cannot be written (read-only); stage tally still has to run there" in capsys.readouterr().err


def test_two_runs_started_together_one_owns_the_folder(tmp_path):
    folder = tmp_path / "run"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from pathlib import Path\n"
            "from glotkit.errors import GlotkitError\n"
            "from glotkit.systems.runner import owned\n"
            "try:\n"
            f"    with owned(Path({str(folder)!r}), 'racer'):\n"
            "        print('owner', flush=True)\n"
            "        sys.stdin.readline()\n"  # holds the folder until told to go
            "except GlotkitError as e:\n"
            "    print('refused', e, flush=True)\n")
    racers = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        first = [r.stdout.readline().strip() for r in racers]
        assert sorted(line.split()[0] for line in first) == ["owner", "refused"], first
        refused = next(line for line in first if line.startswith("refused"))
        assert "in use by process" in refused and "racer" in refused
    finally:
        for r in racers:
            r.communicate("go\n", timeout=120)
    assert not (folder / ".lock").exists()


def test_replaced_model_weights_and_corpus_folders_make_stages_stale(tmp_path, tiny_llama, capsys):
    import shutil

    from conftest import build_model
    from glotkit.systems.runner import hash_input

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    test = write_qa_jsonl(tmp_path / "test.jsonl", 3, offset=100)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "t", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model)},
                                  "data": {"train": str(test), "test": str(test)},
                                  "eval": {"max_new_tokens": 2, "batch_size": 4}, "stages": ["eval_base"]}))
    assert main(["run", "--no-progress", str(recipe)]) == 0
    assert main(["run", "--no-progress", str(recipe)]) == 0
    assert "made from other inputs" not in capsys.readouterr().err  # same weights: kept
    other = tmp_path / "other"
    build_model(other, "llama", seed=5)
    shutil.copy(other / "model.safetensors", model / "model.safetensors")  # new weights, same folder
    assert main(["run", "--no-progress", str(recipe)]) == 0
    assert "stage eval_base was made from other inputs" in capsys.readouterr().err
    assert (tmp_path / "runs" / "t" / "eval_base.previous-1").is_dir()
    # a folder (a corpus) hashes its files' names and contents; the memo skips unchanged files
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("unu", encoding="utf-8")
    known: dict = {}
    first = hash_input(corpus, known)
    assert first.startswith("dir:") and hash_input(corpus, known) == first
    (corpus / "b.txt").write_text("doi", encoding="utf-8")
    assert hash_input(corpus, known) != first
