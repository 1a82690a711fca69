"""Run a recipe's stages in its run folder; every stage reads and writes files there.

``runs/<name>/`` holds::

    config.yaml        the fully resolved recipe (a rerun with a different one is refused)
    versions.json      library versions and the device
    eval_base/         predictions.jsonl + metrics.json of the base model
    train/             checkpoint.pt while training, log.jsonl (loss per step), result.json
    adapter/           the LoRA adapter in PEFT format (PeftModel.from_pretrained loads it)
    eval_tuned/        predictions.jsonl + metrics.json of the adapted model
    metrics.json       {"base": {...}, "tuned": {...}}
    predictions.jsonl  per test example: question, gold, generations, answers, em/f1 of both
    report.md, loss.png

A stage whose outputs exist is skipped, so the same command resumes an interrupted run.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Callable

import yaml

from glotkit.config import Recipe, dump_recipe
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json

# keys that change how a run is carried out but not its results
_RESULT_NEUTRAL = {("train", "checkpoint_every"), ("train", "max_tokens_per_forward"),
                   ("eval", "batch_size")}


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if path == "sweep":  # a sweep block describes other runs, not this one
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, path + ".")
        elif a != b and tuple(path.split(".")) not in _RESULT_NEUTRAL:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def prepare_run_dir(recipe: Recipe) -> Path:
    """Create the run folder, or check that an existing one was made with the same recipe."""
    run_dir = recipe.run_dir()
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        changes = _diff(old, recipe.to_dict())
        if changes:
            raise GlotkitError(
                f"{saved}: this run folder was made with a different recipe ({changes[0]}"
                f"{f' and {len(changes) - 1} more' if len(changes) > 1 else ''}); "
                "give the run a new name (--set name=...) or delete the folder"
            )
        dump_recipe(recipe, saved)  # refresh result-neutral keys
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, saved)
    return run_dir


def versions(device: str) -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "platform": platform.platform(), "device": device,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    for pkg in ("glotkit", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run_recipe(recipe: Recipe, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Run every stage of the recipe that is not finished yet; return the run folder."""
    from glotkit.data.prompts import EncodeStats, PromptFormatter
    from glotkit.data.qa import load_qa_data
    from glotkit.eval.qa_eval import evaluate_qa
    from glotkit.models.loading import load_model
    from glotkit.models.lora import apply_lora, count_trainable
    from glotkit.report import write_report
    from glotkit.train.engine import train

    import torch

    data = load_qa_data(recipe.data, recipe.seed)
    for w in data.warnings:
        log(f"[glotkit] warning: {w}")
    run_dir = prepare_run_dir(recipe)
    log(f"[glotkit] run '{recipe.name}' in {run_dir}: {len(data.train)} train / {len(data.test)} test examples")
    stages = set(recipe.stages)
    adapter_dir = run_dir / "adapter"
    train_dir = run_dir / "train"
    todo = [
        ("eval_base" in stages and not (run_dir / "eval_base" / "metrics.json").is_file()),
        ("train" in stages and not (train_dir / "result.json").is_file()),
        ("eval_tuned" in stages and not (run_dir / "eval_tuned" / "metrics.json").is_file()),
    ]
    if any(todo):
        torch.manual_seed(recipe.seed)
        model, tok, device = load_model(recipe.model, log=log)
        atomic_write_json(run_dir / "versions.json", versions(device))
        fmt = PromptFormatter(recipe.prompt, tok, recipe.model.chat_template)
        lang = recipe.data.language

        if todo[0]:
            m = evaluate_qa(model, tok, fmt, data.test, recipe.eval, language=lang, out_dir=run_dir / "eval_base",
                            device=device, desc="eval base", log=log, progress=progress)
            log(f"[glotkit] base model: EM {m['em']:.2f}  F1 {m['f1']:.2f}  (n={m['n']})")

        if todo[1]:
            torch.manual_seed(recipe.seed)
            peft_model = apply_lora(model, recipe.lora)
            params = count_trainable(peft_model)
            log(f"[glotkit] {params.line()}")
            stats = EncodeStats()
            encoded = [e for ex in data.train
                       if (e := fmt.encode_train(ex, recipe.train.max_length, recipe.train.too_long, stats)) is not None]
            note = stats.line(recipe.train.max_length)
            if note:
                log(f"[glotkit] warning: {note}")
            result = train(peft_model, encoded, recipe.train, seed=recipe.seed, work_dir=train_dir,
                           pad_id=tok.pad_token_id, device=device, log=log, progress=progress)
            tmp = run_dir / ".adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            peft_model.save_pretrained(tmp)
            shutil.rmtree(adapter_dir, ignore_errors=True)
            os.replace(tmp, adapter_dir)
            info = result.to_dict()
            info.pop("log")
            info.update(trainable_params=params.trainable, all_params=params.total,
                        trainable_percent=round(params.percent, 4), trainable_line=params.line(),
                        encode={"total": stats.total, "kept": stats.kept, "truncated": stats.truncated,
                                "dropped": stats.dropped})
            atomic_write_json(train_dir / "result.json", info)
            (train_dir / "checkpoint.pt").unlink(missing_ok=True)
            log(f"[glotkit] trained {result.steps} steps in {result.seconds:.0f}s: "
                f"{result.tokens_per_s:.0f} tokens/s, final loss {result.final_loss}, "
                f"peak RSS {result.memory['peak_rss_mb']:.0f} MB")
            model = peft_model
        if todo[2]:
            if not adapter_dir.is_dir():
                raise GlotkitError(f"{adapter_dir}: no adapter to evaluate; add 'train' to stages")
            if not hasattr(model, "peft_config"):
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter_dir))
            m = evaluate_qa(model, tok, fmt, data.test, recipe.eval, language=lang, out_dir=run_dir / "eval_tuned",
                            device=device, desc="eval tuned", log=log, progress=progress)
            log(f"[glotkit] tuned model: EM {m['em']:.2f}  F1 {m['f1']:.2f}  (n={m['n']})")
    if "report" in stages:
        path = write_report(run_dir, recipe)
        log(f"[glotkit] report: {path}")
    return run_dir
