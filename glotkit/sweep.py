"""Sweeps: run a grid of recipe variants and tabulate them, one after another or as Ray tasks.

    glotkit sweep RECIPE --grid lora.r=1,2,4,8 --grid 'lora.target_modules=q_proj,v_proj|q_proj,k_proj,v_proj,o_proj'
    glotkit sweep RECIPE --grid lora.r=1,2,4,8 --backend ray [--workers 2] [--trial-cpus 1] [--trial-gpus 0] [--address ADDR]

or a ``sweep:`` block in the recipe (``lora.r: [1, 2, 4, 8]``).  Values are separated by commas,
or by ``|`` when a value itself contains commas.  Every trial is an ordinary run folder under
``runs/<name>-sweep/``; finished trials are skipped, so an interrupted sweep continues where it
stopped.  Any system can be swept: the table holds whatever the system's ``summary`` reports
(QA: EM/F1; pretraining: perplexity; XL-LoRA: STS and retrieval; distillation: scores).  When
the grid touches only the adapter and training and the recipe evaluates its base model, the base
model is evaluated once and shared by all trials.  Results: ``sweep.csv``, ``sweep.md`` and
``<metric>_vs_<key>.png``.

With ``--backend ray`` each pending trial is a Ray task (a local cluster of ``--workers`` ×
``--trial-cpus`` CPUs by default, or the cluster at ``--address``) with its own CPU/GPU request and
no retry; a trial whose process dies or raises is marked ``failed`` in the table, with the
reason, and the others go on.  The table is rewritten as each trial ends; a rerun runs only the
trials that are not finished.  Each trial's log is ``<trial>.log`` in the sweep folder.
"""

from __future__ import annotations

import csv
import gc
import io
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from glotkit.config import RecipeBase, apply_override
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_text, new_figure, save_figure
from glotkit.logs import prefixed, say
from glotkit.systems import system_of, validate_recipe

_SHARED_BASE_SECTIONS = {"lora", "train"}


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """``lora.r=1,2,4`` -> ("lora.r", [1, 2, 4]); ``|`` separates values that contain commas."""
    if "=" not in item:
        raise GlotkitError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid lora.r=1,2,4,8")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = text.split("|") if "|" in text else text.split(",")
    values = []
    for part in parts:
        part = part.strip()
        if not part:
            raise GlotkitError(f"--grid {item!r}: empty value")
        try:
            values.append(yaml.safe_load(part))
        except yaml.YAMLError:
            values.append(part)
    return key, values


def _value_tag(v: Any) -> str:
    if isinstance(v, list):
        v = "+".join(map(str, v))
    text = str(v).replace(",", "+")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def trial_recipes(recipe: RecipeBase, grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any], RecipeBase]]:
    keys = list(grid)
    fixed = [k for k in keys if k.split(".")[0] in ("name", "runs_dir", "sweep")]
    if fixed:
        raise GlotkitError(f"sweep: {fixed[0]}: cannot be swept (the sweep names its trials and their folder)")
    out = []
    seen: dict[str, str] = {}
    base = recipe.to_dict()
    base["sweep"] = {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        raw = json.loads(json.dumps(base))
        for k, v in zip(keys, combo):
            apply_override(raw, k.split("."), v)
        tag = ",".join(f"{k.split('.')[-1]}={_value_tag(v)}" for k, v in zip(keys, combo))
        raw["name"] = f"{recipe.name}--{tag}"
        if raw["name"] in seen:  # two values that differ only in characters a folder name cannot hold
            raise GlotkitError(f"sweep: trials {seen[raw['name']]} and {combo!r} would share the folder "
                               f"'{raw['name']}'; give values that differ in letters or digits")
        seen[raw["name"]] = repr(combo)
        raw["runs_dir"] = str(Path(recipe.runs_dir) / f"{recipe.name}-sweep")
        out.append((raw["name"], dict(zip(keys, combo)), validate_recipe(raw, where=f"sweep trial {tag}")))
    return out


def run_sweep(recipe: RecipeBase, grid_args: list[str], log: Callable[[str], None] = say, progress: bool = True, *,
              backend: str = "local", address: str | None = None, workers: int | None = None,
              trial_cpus: float = 1.0, trial_gpus: float = 0.0) -> Path:
    from glotkit.systems.runner import owned

    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # before any trial or base evaluation runs
            raise GlotkitError("--backend ray needs Ray: pip install 'glotkit[ray]'")
    grid = dict(recipe.sweep)
    for item in grid_args:
        k, v = parse_grid(item)
        grid[k] = v
    if not grid:
        raise GlotkitError("sweep: nothing to sweep; give --grid key=v1,v2 or a 'sweep:' block in the recipe")
    trials = trial_recipes(recipe, grid)
    sweep_dir = Path(recipe.runs_dir) / f"{recipe.name}-sweep"
    with owned(sweep_dir, f"glotkit sweep '{recipe.name}'", lock_name=".sweep.lock"):  # one sweep at a time
        _sweep(recipe, grid, trials, sweep_dir, log, progress, backend=backend, address=address, workers=workers,
               trial_cpus=trial_cpus, trial_gpus=trial_gpus)
    return sweep_dir


def _sweep(recipe: RecipeBase, grid: dict[str, list[Any]], trials, sweep_dir: Path, log, progress: bool, *,
           backend: str, address: str | None, workers: int | None, trial_cpus: float, trial_gpus: float) -> None:
    from glotkit.systems.runner import run_recipe

    log(f"sweep of {len(trials)} trials over {', '.join(grid)} in {sweep_dir}")

    share_base = all(k.split(".")[0] in _SHARED_BASE_SECTIONS for k in grid) and "eval_base" in recipe.stages
    base_eval = None
    if share_base:
        raw = recipe.to_dict()
        raw.update(name="base", runs_dir=str(sweep_dir), stages=["eval_base"], sweep={})
        base_recipe = validate_recipe(raw, where="sweep base")
        run_recipe(base_recipe, log=log, progress=progress)
        base_eval = sweep_dir / "base" / "eval_base"

    system = system_of(recipe)

    def finished(run_dir: Path) -> bool:
        return (run_dir / "report.md").is_file() and bool(system.summary(system.folder_type(run_dir)))

    results: dict[str, tuple[str, str]] = {}
    todo = []
    for i, (name, values, trial) in enumerate(trials, 1):
        run_dir = trial.run_dir()
        if base_eval is not None:
            trial = trial.model_copy(update={"stages": [s for s in trial.stages if s != "eval_base"]})
            if not (run_dir / "eval_base" / "metrics.json").is_file():
                run_dir.mkdir(parents=True, exist_ok=True)
                tmp = run_dir / ".eval_base.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(base_eval, tmp)
                os.replace(tmp, run_dir / "eval_base")
        if finished(run_dir):
            log(f"trial {name}: finished before, skipped")
            results[name] = ("ok", "")
        else:
            todo.append((i, name, trial))

    def table() -> list[dict[str, Any]]:
        rows = [_row(system, name, values, trial.run_dir(), *results[name]) for name, values, trial in trials
                if name in results]
        _paired_against_best(system, trials, rows)
        _write_tables(sweep_dir, list(grid), rows)
        return rows

    if backend == "ray":
        for name, status, error in _run_on_ray(todo, sweep_dir, address=address, workers=workers,
                                               trial_cpus=trial_cpus, trial_gpus=trial_gpus, log=log):
            results[name] = (status, error)
            table()
    else:
        for i, name, trial in todo:
            log(f"trial {i}/{len(trials)}: {name}")
            status, error = "ok", ""
            try:
                run_recipe(trial, log=log, progress=progress)
            except GlotkitError as err:
                status, error = "failed", str(err)
                log(f"trial {name} failed: {err}")
            gc.collect()
            results[name] = (status, error)
            table()
    rows = table()
    _plot(sweep_dir, list(grid), rows)
    log(f"sweep table: {sweep_dir / 'sweep.md'}")


def _ray_trial(raw: dict, cwd: str, log_path: str) -> tuple[str, str]:
    """One trial in a Ray worker process: the recipe as plain data, run with the driver's
    working directory; its log goes to ``log_path``."""
    import signal

    from glotkit.runtime import quiet_libraries
    from glotkit.systems.runner import run_recipe

    os.chdir(cwd)
    quiet_libraries()
    recipe = validate_recipe(raw, where=f"trial {raw.get('name')}")
    if os.environ.get("GLOTKIT_TEST_KILL_TRIAL") == recipe.name:  # tests: a trial whose process dies
        os.kill(os.getpid(), signal.SIGKILL)
    with open(log_path, "a", encoding="utf-8") as fh:
        def write(line: str) -> None:
            fh.write(line + "\n")
            fh.flush()

        log = prefixed(write)

        try:
            run_recipe(recipe, log=log, progress=False)
        except GlotkitError as err:
            log(f"failed: {err}")
            return "failed", str(err)
    return "ok", ""


def _run_on_ray(todo, sweep_dir: Path, *, address: str | None, workers: int | None, trial_cpus: float,
                trial_gpus: float, log: Callable[[str], None]):
    """Yield (trial name, status, error) as the Ray tasks of the pending trials end."""
    try:
        import ray
    except ImportError:
        raise GlotkitError("--backend ray needs Ray: pip install 'glotkit[ray]'") from None
    if not todo:
        return
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=max(1, int((workers or 1) * trial_cpus)), num_gpus=int(trial_gpus * (workers or 1)),
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
    remote_trial = ray.remote(_ray_trial).options(num_cpus=trial_cpus, num_gpus=trial_gpus, max_retries=0)
    refs = {}
    for i, name, trial in todo:
        raw = trial.to_dict() | {"runs_dir": str(Path(trial.runs_dir).resolve())}
        refs[remote_trial.remote(raw, os.getcwd(), str((sweep_dir / f"{name}.log").resolve()))] = name
    log(f"{len(refs)} trials submitted to Ray ({trial_cpus:g} CPU, {trial_gpus:g} GPU each)")
    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            name = refs[done[0]]
            try:
                status, error = ray.get(done[0])
            except ray.exceptions.RayError as err:  # the worker died, or raised something unexpected
                status, error = "failed", f"{type(err).__name__}: {str(err).splitlines()[0]}"
            log(f"trial {name}: {status}" + (f" ({error})" if error else ""))
            yield name, status, error
    finally:
        if started:
            ray.shutdown()


def _row(system, name: str, values: dict[str, Any], run_dir: Path, status: str, error: str) -> dict[str, Any]:
    summary = system.summary(system.folder_type(run_dir))
    if status == "ok" and not summary:
        status = "incomplete"
    return {"trial": name, **{k: values[k] for k in values}, "status": status, **summary, "error": error}


def _paired_against_best(system, trials, rows: list[dict[str, Any]]) -> str | None:
    """For systems that give per-item scores (``item_scores``): each trial's main figure minus the
    best trial's on the same items, with the paired bootstrap interval (over the system's
    clusters, e.g. QA contexts), in the row as ``vs_best_<metric>``; returns that metric."""
    from glotkit.eval.uncertainty import paired_difference

    items = getattr(system, "item_scores", None)
    if items is None:
        return None
    scores = {}
    for name, _, trial in trials:
        row = next((r for r in rows if r["trial"] == name and r["status"] == "ok"), None)
        got = items(system.folder_type(trial.run_dir())) if row else None
        if got:
            scores[name] = got
    if len(scores) < 2:
        return None
    first = next(iter(scores.values()))
    metric = "f1" if "f1" in first["scores"] else next(iter(first["scores"]))
    best = max(scores, key=lambda n: sum(scores[n]["scores"][metric]))
    ref = scores[best]
    for r in rows:
        mine = scores.get(r["trial"])
        if not mine or mine["ids"] != ref["ids"] or metric not in mine["scores"]:
            continue
        clusters = ref["clusters"] if all(c is not None for c in ref["clusters"]) else None
        r[f"vs_best_{metric}"] = paired_difference(ref["scores"][metric], mine["scores"][metric], clusters)
    return metric


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict) and "difference" in v:
        from glotkit.eval.uncertainty import fmt_change

        return fmt_change(v)
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols |= dict.fromkeys(k for k in r if k != "error")
    return list(cols) + ["error"]


def _metric_columns(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The system's figures shown in sweep.md: every summary column but the base model's (an
    interval ``<metric>_ci`` is shown inside its metric's cell)."""
    skip = set(keys) | {"trial", "status", "error", "train_seconds"}
    return [c for c in _columns(rows) if c not in skip and not c.startswith("base_") and not c.endswith("_ci")]


def _shown(r: dict[str, Any], k: str) -> str:
    from glotkit.eval.uncertainty import fmt

    v = r.get(k)
    if isinstance(v, float) and r.get(f"{k}_ci"):
        return fmt(v, r[f"{k}_ci"])
    return _cell(v)


def _write_tables(sweep_dir: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    cols = _columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in cols})
    atomic_write_text(sweep_dir / "sweep.csv", buf.getvalue())
    show = keys + _metric_columns(keys, rows) + ["status"]
    lines = ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    for r in rows:
        lines.append("| " + " | ".join(_shown(r, k) for k in show) + " |")
    paired = next((k for r in rows for k in r if k.startswith("vs_best_")), None)
    if paired or any(k.endswith("_ci") for r in rows for k in r):
        lines += ["", "[…]: 95 % percentile bootstrap interval (1000 resamples, seed 0; QA over contexts)."
                  + (f" {paired}: this trial minus the best trial's {paired[8:]} on the same items, paired "
                     "bootstrap; * where the interval excludes zero (the difference is not noise)." if paired else "")]
    base = next((r for r in rows if any(k.startswith("base_") and v is not None for k, v in r.items())), None)
    if base:
        lines += ["", "Base model: " + ", ".join(f"{k[5:]} {v}" for k, v in base.items()
                                                 if k.startswith("base_") and v is not None) + "."]
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        lines.append(f"- {r['trial']} failed: {r['error']}")
    atomic_write_text(sweep_dir / "sweep.md", "\n".join(lines) + "\n")


def _plot(sweep_dir: Path, keys: list[str], rows: list[dict[str, Any]]) -> Path | None:
    metrics = [c for c in _metric_columns(keys, rows) if c not in ("trainable_params", "trainable_percent",
                                                                  "tokens_per_s")
               and any(isinstance(r.get(c), (int, float)) for r in rows)]
    if not metrics:
        return None
    metric = "f1" if "f1" in metrics else metrics[0]
    done = [r for r in rows if isinstance(r.get(metric), (int, float))]
    x_key = "lora.r" if "lora.r" in keys else keys[0]
    others = [k for k in keys if k != x_key]
    fig, ax = new_figure(6, 3.8)
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(" ".join(f"{k.split('.')[-1]}={_cell(r[k])}" for k in others) or metric, []).append(r)
    for label, rs in groups.items():
        try:
            rs = sorted(rs, key=lambda r: r[x_key])
        except TypeError:
            pass
        ax.plot([_cell(r[x_key]) for r in rs], [r[metric] for r in rs], marker="o", label=label)
    if done[0].get(f"base_{metric}") is not None:
        ax.axhline(done[0][f"base_{metric}"], color="grey", ls="--", lw=1, label="base model")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", metric).strip("_")
    return save_figure(fig, sweep_dir / f"{name}_vs_{x_key.split('.')[-1]}.png")
