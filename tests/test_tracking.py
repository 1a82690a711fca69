"""train.report_to: what reaches TensorBoard and MLflow, read back with their own readers; a run
continued later logs into the same tracked run."""

from __future__ import annotations

import json

import pytest

from glotkit.cli import main


def _run(tmp_path, model, stages, report_to):
    from test_sft import _recipe

    recipe = _recipe(tmp_path, model, stages=stages, train={"report_to": report_to, "max_steps": 4})
    assert main(["run", "--no-progress", str(recipe)]) == 0
    return tmp_path / "runs" / "chat"


def test_tensorboard_and_mlflow_get_steps_params_and_stage_metrics(tmp_path, tiny_gemma, capsys):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path, tiny_gemma, ["eval_base", "train"], ["tensorboard", "mlflow"])
    assert "tracking: tensorboard, mlflow" in capsys.readouterr().err
    events = EventAccumulator(str(run / "tracking" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/peak_rss_mb", "eval_base/nll_per_token"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "recipe" in events.Tags()["tensors"] or events.Tags().get("tensors") is not None

    ids = json.loads((run / "tracking" / "ids.json").read_text())
    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "tracking" / "mlruns").resolve().as_uri())
    logged = client.get_run(ids["mlflow"])
    assert logged.data.params["lora.r"] == "4" and logged.data.params["system"] == "sft"
    assert logged.info.status == "FINISHED"
    history = client.get_metric_history(ids["mlflow"], "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    steps = [json.loads(s) for s in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert [round(m.value, 6) for m in history] == [s["loss"] for s in steps]

    # the same run folder later (the tuned evaluation): the same tracked run, not a new one
    _run(tmp_path, tiny_gemma, ["eval_base", "train", "eval_tuned"], ["tensorboard", "mlflow"])
    assert json.loads((run / "tracking" / "ids.json").read_text())["mlflow"] == ids["mlflow"]
    exp = client.get_experiment_by_name("glotkit")
    assert len(client.search_runs([exp.experiment_id])) == 1
    metrics = client.get_run(ids["mlflow"]).data.metrics
    assert "eval_tuned/nll_per_token" in metrics and "eval_base/nll_per_token" in metrics
    assert "summary/nll_per_token" in metrics


def test_missing_tracker_is_one_line(tmp_path, tiny_gemma, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    from test_sft import _recipe

    recipe = _recipe(tmp_path, tiny_gemma, stages=["train"], train={"report_to": ["wandb"]})
    assert main(["run", "--no-progress", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.report_to: wandb is not installed (pip install wandb" in err
    assert not (tmp_path / "runs" / "chat" / "adapter").exists()
