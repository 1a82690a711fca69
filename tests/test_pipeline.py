"""End to end on a tiny model: the run folder, PEFT reload, resume after kill -9, sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glotkit.cli import main

REPO = Path(__file__).resolve().parents[1]


def _write_recipe(tmp_path: Path, model_dir: Path, train_file: Path, test_file: Path, **extra) -> Path:
    raw = {"name": "tiny", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(model_dir)},
           "data": {"train": str(train_file), "test": str(test_file)},
           "lora": {"r": 4, "target_modules": "all-linear"},
           "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2},
           "eval": {"max_new_tokens": 4, "batch_size": 4}}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    p = tmp_path / "recipe.yaml"
    p.write_text(json.dumps(raw), encoding="utf-8")
    return p


def test_run_writes_everything_and_adapter_reloads(tmp_path, tiny_gemma, qa_files, capsys):
    recipe = _write_recipe(tmp_path, tiny_gemma, *qa_files)
    assert main(["run", "--no-progress", str(recipe)]) == 0
    run = tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "versions.json", "metrics.json", "predictions.jsonl", "report.md", "loss.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "train/log.jsonl"):
        assert (run / name).is_file(), name
    assert not (run / "train" / "checkpoint.pt").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    for tag in ("base", "tuned"):
        assert {"em", "f1", "em_raw", "f1_raw", "n"} <= set(metrics[tag]) and metrics[tag]["n"] == 6
        lo, hi = metrics[tag]["f1_ci"]  # bootstrap over contexts, written with its method
        assert lo <= metrics[tag]["f1"] <= hi and "over contexts" in metrics[tag]["ci_method"]
    preds = [json.loads(s) for s in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and {"question", "gold", "base", "tuned"} <= set(preds[0])
    assert {"generation", "prediction", "em", "f1"} <= set(preds[0]["tuned"])
    err = capsys.readouterr().err
    assert "trainable params:" in err and "trainable%:" in err

    # the adapter loads with plain PEFT and reproduces the tuned generations
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma)
    model = PeftModel.from_pretrained(base, run / "adapter")
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)
    report = (run / "report.md").read_text()
    assert "| base |" in report and "| tuned |" in report and "tokens/s" in report and "peak memory" in report
    assert "Change, tuned − base on the same 6 items: EM" in report and "paired percentile bootstrap" in report

    # a second run does nothing again
    assert main(["run", "--no-progress", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "resuming" not in err and "trained" not in err and "base model:" not in err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupt_then_resume_matches_uninterrupted(tmp_path, tiny_llama, qa_files, sig):
    """Kill (or Ctrl-C) the real CLI mid-training, rerun the same command, compare with an uninterrupted run."""
    steps = 400
    extra = {"train": {"max_steps": steps, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 5},
             "stages": ["train"]}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "glotkit", "run", "--no-progress"]

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = _write_recipe(ref_dir, tiny_llama, *qa_files, **extra)
    subprocess.run(cmd + [str(ref)], env=env, check=True, capture_output=True, timeout=600)

    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()
    rec = _write_recipe(kill_dir, tiny_llama, *qa_files, **extra)
    ckpt = kill_dir / "runs" / "tiny" / "train" / "checkpoint.pt"
    proc = subprocess.Popen(cmd + [str(rec)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 900  # bounds a hang only
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.fail("training finished before it could be killed; raise the step count")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert b"interrupted" in err and b"Traceback" not in err
    assert not (kill_dir / "runs" / "tiny" / "adapter").exists()
    out = subprocess.run(cmd + [str(rec)], env=env, check=True, capture_output=True, text=True, timeout=600)
    assert "resuming training from step" in out.stderr

    from safetensors.torch import load_file

    a = load_file(ref_dir / "runs" / "tiny" / "adapter" / "adapter_model.safetensors")
    b = load_file(kill_dir / "runs" / "tiny" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    la = [json.loads(s)["loss"] for s in (ref_dir / "runs/tiny/train/log.jsonl").read_text().splitlines()]
    lb = [json.loads(s)["loss"] for s in (kill_dir / "runs/tiny/train/log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == steps
    assert lb == pytest.approx(la, abs=1e-5)


def test_sweep_table_and_restart(tmp_path, tiny_llama, qa_files, capsys):
    recipe = _write_recipe(tmp_path, tiny_llama, *qa_files, lora={"alpha": "4r"}, train={"max_steps": 2})
    argv = ["sweep", "--no-progress", str(recipe), "--grid", "lora.r=1,2",
            "--grid", "lora.target_modules=q_proj,v_proj|q_proj,k_proj,v_proj,o_proj"]
    assert main(argv) == 0
    sweep = tmp_path / "runs" / "tiny-sweep"
    rows = (sweep / "sweep.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("trial,lora.r,lora.target_modules,status,trainable_params")
    assert (sweep / "sweep.md").is_file() and (sweep / "f1_vs_r.png").is_file()
    err = capsys.readouterr().err
    assert err.count("base model: EM") == 1  # the base model is evaluated once for all trials
    cfg = (sweep / "tiny--r=2,target_modules=q_proj+k_proj+v_proj+o_proj" / "config.yaml").read_text()
    assert "alpha: 4r" in cfg
    import csv

    table = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert all(r["status"] == "ok" and float(r["trainable_percent"]) > 0 for r in table)
    by_r = {r["lora.r"]: int(r["trainable_params"]) for r in table if r["lora.target_modules"] == "q_proj,v_proj"}
    assert by_r["2"] == 2 * by_r["1"]
    # each figure with its interval, and each trial against the best one on the same items (paired)
    md = (sweep / "sweep.md").read_text()
    assert "vs_best_f1" in md and "paired bootstrap" in md and "+0.00 [+0.00, +0.00] |" in md  # the best against itself
    f1s = {r["trial"]: float(r["f1"]) for r in table}
    best = max(f1s, key=f1s.get)
    for r in table:
        diff = float(r["vs_best_f1"].split(" ")[0])
        assert diff == pytest.approx(f1s[r["trial"]] - f1s[best], abs=0.02)
    # rerun: every trial is skipped
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("finished before, skipped") == 4


def test_sweep_on_ray_survives_a_killed_trial(tmp_path, tiny_llama, qa_files, capsys, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'glotkit[ray]')")
    import csv

    recipe = _write_recipe(tmp_path, tiny_llama, *qa_files, lora={"alpha": "4r"}, train={"max_steps": 2})
    argv = ["sweep", "--no-progress", str(recipe), "--grid", "lora.r=1,2,4,8", "--backend", "ray", "--workers", "2"]
    monkeypatch.setenv("GLOTKIT_TEST_KILL_TRIAL", "tiny--r=4")  # that trial's process dies (SIGKILL)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    sweep = tmp_path / "runs" / "tiny-sweep"
    table = {r["trial"]: r for r in csv.DictReader((sweep / "sweep.csv").open())}
    assert list(table) == ["tiny--r=1", "tiny--r=2", "tiny--r=4", "tiny--r=8"]  # grid order, whatever ends first
    assert table["tiny--r=4"]["status"] == "failed" and "WorkerCrashedError" in table["tiny--r=4"]["error"]
    assert all(table[t]["status"] == "ok" and table[t]["f1"] for t in ("tiny--r=1", "tiny--r=2", "tiny--r=8"))
    assert "steps in" in (sweep / "tiny--r=2.log").read_text()
    capsys.readouterr()
    monkeypatch.delenv("GLOTKIT_TEST_KILL_TRIAL")
    assert main(argv) == 0  # the rerun runs only the failed trial
    err = capsys.readouterr().err
    assert err.count("finished before, skipped") == 3 and "1 trials submitted to Ray" in err
    table = {r["trial"]: r for r in csv.DictReader((sweep / "sweep.csv").open())}
    assert all(r["status"] == "ok" for r in table.values())


def test_sweep_ray_missing_says_which_extra(tmp_path, tiny_llama, qa_files, capsys, monkeypatch):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find(name, *a))
    recipe = _write_recipe(tmp_path, tiny_llama, *qa_files, train={"max_steps": 1}, stages=["train", "eval_tuned", "report"])
    assert main(["sweep", "--no-progress", str(recipe), "--grid", "lora.r=1,2", "--backend", "ray"]) == 2
    assert "--backend ray needs Ray: pip install 'glotkit[ray]'" in capsys.readouterr().err
