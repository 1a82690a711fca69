"""Experiment tracking: the training loop's steps and each stage's metrics, sent to the trackers
a recipe names in ``train.report_to`` (TensorBoard, MLflow, W&B, trackio; none by default).

Each tracker is imported only when asked for (a missing one is a one-line error naming its
package) and works offline: TensorBoard event files and MLflow's local file store under the run
folder (``tracking/``) unless ``MLFLOW_TRACKING_URI`` says otherwise, W&B in offline mode unless
``WANDB_MODE`` says otherwise, trackio locally.  The resolved recipe is the tracked run's
parameters.  The run ids are kept in ``tracking/ids.json``, so a resumed glotkit run continues the
same tracked run (its steps after the checkpoint are added to it) instead of starting another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from glotkit.errors import GlotkitError

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb", "trackio": "trackio"}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}`` (lists and None as JSON text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v, ensure_ascii=False)
    return out


def numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric values of a (nested) metrics dict, flattened."""
    return {k: float(v) for k, v in flatten(d, prefix).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _missing(name: str) -> GlotkitError:
    return GlotkitError(f"train.report_to: {name} is not installed (pip install {_PACKAGES[name]}, or "
                        f"pip install 'glotkit[track]')")


class Tracker:
    """Sends steps and metrics to every tracker asked for; only the process that writes tracks."""

    def __init__(self, names: list[str], folder: Path, run_name: str, params: dict,
                 log: Callable[[str], None] = lambda m: None):
        self.folder = Path(folder)
        self.dir = self.folder / "tracking"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ids_file = self.dir / "ids.json"
        ids = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {}
        self.sinks: list[tuple[str, Any]] = []
        flat = flatten(params)
        for name in names:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise _missing(name) from None
                w = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
                if "tensorboard" not in ids:
                    w.add_text("recipe", "```\n" + json.dumps(params, indent=1, ensure_ascii=False) + "\n```", 0)
                    ids["tensorboard"] = str(self.dir / "tensorboard")
                self.sinks.append((name, w))
            elif name == "mlflow":
                try:
                    from mlflow.tracking import MlflowClient
                except ImportError:
                    raise _missing(name) from None
                uri = os.environ.get("MLFLOW_TRACKING_URI")
                if not uri:  # the local file store (MLflow 3 keeps it, in maintenance, behind this switch)
                    uri = (self.dir / "mlruns").resolve().as_uri()
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                client = MlflowClient(tracking_uri=uri)
                run_id = ids.get("mlflow")
                if run_id is None:
                    exp = client.get_experiment_by_name("glotkit")
                    exp_id = exp.experiment_id if exp else client.create_experiment("glotkit")
                    run_id = client.create_run(exp_id, run_name=run_name).info.run_id
                    for k, v in flat.items():
                        client.log_param(run_id, k[:250], str(v)[:6000])
                    ids["mlflow"] = run_id
                else:
                    client.update_run(run_id, status="RUNNING")
                self.sinks.append((name, (client, run_id)))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise _missing(name) from None
                os.environ.setdefault("WANDB_MODE", "offline")
                run = wandb.init(project="glotkit", name=run_name, id=ids.get("wandb"), resume="allow",
                                 dir=str(self.dir), config=flat)
                ids["wandb"] = run.id
                self.sinks.append((name, run))
            elif name == "trackio":
                try:
                    import trackio
                except ImportError:
                    raise _missing(name) from None
                run = trackio.init(project="glotkit", name=run_name, config=flat, resume="allow")
                ids["trackio"] = run_name
                self.sinks.append((name, (trackio, run)))
            else:
                raise GlotkitError(f"train.report_to: '{name}' is not a tracker ({', '.join(TRACKERS)})")
        self.ids_file.write_text(json.dumps(ids, indent=1))
        if names:
            log(f"tracking: {', '.join(names)} (ids in {self.ids_file})")

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, sink in self.sinks:
            if name == "tensorboard":
                for k, v in metrics.items():
                    sink.add_scalar(k, v, step if step is not None else 0)
                sink.flush()
            elif name == "mlflow":
                client, run_id = sink
                for k, v in metrics.items():
                    client.log_metric(run_id, k, v, step=step or 0)
            elif name == "wandb":
                sink.log(metrics, step=step) if step is not None else sink.log(metrics)
            elif name == "trackio":
                mod, _ = sink
                mod.log(metrics, step=step)

    def step(self, record: dict) -> None:
        """One training step's record from the engine (loss, lr, tokens, seconds, memory)."""
        step = int(record["step"])
        self.log({f"train/{k}": float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                 step)

    def step_of(self, name: str) -> Callable[[dict], None]:
        """The step logger of one of several trainings in a stage (``train/NAME/...``)."""
        return lambda record: self.step({f"{name}/{k}" if k != "step" else k: v for k, v in record.items()})

    def close(self, finished: bool = True) -> None:
        for name, sink in self.sinks:
            if name == "tensorboard":
                sink.close()
            elif name == "mlflow":
                client, run_id = sink
                client.set_terminated(run_id, status="FINISHED" if finished else "KILLED")
            elif name == "wandb":
                sink.finish()
            elif name == "trackio":
                sink[0].finish()
        self.sinks = []
