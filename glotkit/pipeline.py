"""Run a recipe's stages in its run folder; every stage reads and writes files there.

``runs/<name>/`` holds::

    config.yaml        the fully resolved recipe (a rerun with a different one is refused)
    versions.json      library versions and the device
    eval_base/         predictions.jsonl + metrics.json of the base model
    train/             checkpoint.pt while training, log.jsonl (loss per step), result.json
    adapter/           the LoRA adapter in PEFT format (PeftModel.from_pretrained loads it)
    eval_tuned/        predictions.jsonl + metrics.json of the adapted model
    suite/             the task suite for base and adapted model: results.json/.md/.png, predictions
    memory.json        the memory table (M1/M2 for fp32, bf16, NF4) with the static estimates
    corpus.json        (pretraining) document and token counts, distinct token ids of the corpus
    metrics.json       {"base": {...}, "tuned": {...}}
    predictions.jsonl  per test example: question, gold, generations, answers, em/f1 of both
    report.md, loss.png

A stage whose outputs exist is skipped, so the same command resumes an interrupted run.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Callable

import yaml

from glotkit.config import Recipe, dump_recipe
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json

# keys that change how a run is carried out but not its results
_RESULT_NEUTRAL = {("train", "checkpoint_every"), ("train", "max_tokens_per_forward"),
                   ("eval", "batch_size"), ("generate", "base_url"), ("generate", "api_key_env"),
                   ("generate", "concurrency"), ("generate", "retries"), ("generate", "timeout")}


# sections whose outputs record their own settings and are redone when these change; stages may
# be added to a finished run
_REDONE_BY_SETTINGS = ("suite.", "memory.", "stages", "synth.", "embed.", "distill.compare_", "distill.untuned",
                       "distill.within_points")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if path in ("sweep", "generate.base_urls"):  # other runs; where a role's server is (as base_url)
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, path + ".")
        elif a != b and tuple(path.split(".")) not in _RESULT_NEUTRAL and not path.startswith(_REDONE_BY_SETTINGS):
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
    from glotkit.models.lora import apply_lora, count_trainable, save_adapter
    from glotkit.report import write_report
    from glotkit.train.engine import train

    import torch

    from glotkit.train.distributed import Parallel, check_recipe

    par = Parallel.from_launch()
    if par.world > 1:
        check_recipe(recipe, par.world, sharded=par.sharded)
    if not par.is_main:
        log = lambda msg: None  # noqa: E731 - one voice: process 0 speaks and writes
    if recipe.task == "xllora":
        from glotkit.synth.xllora import check_inputs, run_xllora

        check_inputs(recipe)
        run_dir = prepare_run_dir(recipe)
        log(f"[glotkit] run '{recipe.name}' in {run_dir}: XL-LoRA, stages {', '.join(recipe.stages)}")
        run_xllora(recipe, run_dir, log=log, progress=progress)
        return run_dir
    if recipe.task == "distill":
        from glotkit.hipe.distill import check_inputs as check_distill, run_distill

        splits = check_distill(recipe, log=log)
        run_dir = prepare_run_dir(recipe)
        log(f"[glotkit] run '{recipe.name}' in {run_dir}: distillation (HIPE-2026), stages {', '.join(recipe.stages)}")
        run_distill(recipe, run_dir, log=log, progress=progress, splits=splits)
        return run_dir
    pretraining = recipe.task == "pretrain"
    if pretraining:
        if not recipe.pretrain.corpus:
            raise GlotkitError("pretrain.corpus: no corpus given (files or folders of .txt, .jsonl or TEI .xml)")
        from glotkit.data.corpus import read_documents

        docs = read_documents(recipe.pretrain.corpus, recipe.pretrain.text_field, recipe.pretrain.language,
                              recipe.pretrain.fix_diacritics)
        if recipe.pretrain.max_docs:
            docs = docs[: recipe.pretrain.max_docs]
        data = None
    else:
        data = load_qa_data(recipe.data, recipe.seed)
        for w in data.warnings:
            log(f"[glotkit] warning: {w}")
    with par.main_first():  # process 0 makes or checks the folder; the others wait and only read
        run_dir = prepare_run_dir(recipe) if par.is_main else recipe.run_dir()
    if pretraining:
        log(f"[glotkit] run '{recipe.name}' in {run_dir}: continued pretraining on {len(docs)} documents")
    else:
        log(f"[glotkit] run '{recipe.name}' in {run_dir}: {len(data.train)} train / {len(data.test)} test examples")
    stages = set(recipe.stages)
    adapter_dir = run_dir / "adapter"
    train_dir = run_dir / "train"
    todo = [
        ("eval_base" in stages and not (run_dir / "eval_base" / "metrics.json").is_file()),
        ("train" in stages and not (train_dir / "result.json").is_file()),
        ("eval_tuned" in stages and not (run_dir / "eval_tuned" / "metrics.json").is_file()),
    ]
    suite_todo = "suite" in stages and _suite_pending(recipe, run_dir)
    if suite_todo:
        _check_suite(recipe)  # bad task names, templates or shots fail now, not after training
    if (suite_todo and "tuned" in recipe.suite.models and not todo[1] and not adapter_dir.is_dir()
            and recipe.generate.backend == "local"):
        raise GlotkitError(f"{adapter_dir}: no adapter for the suite's 'tuned' model; add 'train' to stages "
                           "or set suite.models: [base]")
    if par.world > 1:
        log(f"[glotkit] {par.world} processes ({par.kind}): they train together, then process 0 runs the other stages")
        if not todo[1]:
            log("[glotkit] note: training is already done; the other processes have nothing to do")
        todo, suite_todo = ([False, todo[1], False], False) if not par.is_main else (todo, suite_todo)
    if any(todo) or suite_todo:
        torch.manual_seed(recipe.seed)
        serve = recipe.generate.backend == "openai"
        with par.main_first():  # a built-in model is converted once, by process 0
            if serve and not todo[1]:  # the server generates and scores: the tokenizer is enough
                from glotkit.models.loading import tokenizer_for

                model, device, tok = None, "cpu", tokenizer_for(recipe.model, log=log)
            else:
                model, tok, device = load_model(recipe.model, log=log)
        if par.is_main:
            atomic_write_json(run_dir / "versions.json", versions(device) | {"processes": par.world})
        if pretraining:
            train_rows, held_rows, held_bytes = _pretrain_rows(recipe, docs, tok, log, write=par.is_main)
        else:
            fmt = PromptFormatter(recipe.prompt, tok, recipe.model.chat_template)
            lang = recipe.data.language

        def evaluate(m, tag: str) -> None:
            out_dir = run_dir / f"eval_{tag}"
            if pretraining:
                from glotkit.eval.perplexity import heldout_scores

                out_dir.mkdir(parents=True, exist_ok=True)
                r = heldout_scores(m, held_rows, held_bytes, tok.pad_token_id, progress=progress, desc=f"held-out {tag}")
                atomic_write_json(out_dir / "metrics.json", r)
                log(f"[glotkit] {tag} model, held-out: perplexity {r['perplexity']:.3f}, "
                    f"bits/byte {r['bits_per_byte']:.4f} ({r['tokens']} tokens, {r['bytes']} bytes)")
            else:
                server = None
                if serve:
                    from glotkit.generate.server import ServerGenerator

                    server = ServerGenerator.connect(recipe.generate, tag, log, f"eval {tag}")
                r = evaluate_qa(m, tok, fmt, data.test, recipe.eval, language=lang, out_dir=out_dir,
                                device=device, desc=f"eval {tag}", log=log, progress=progress, server=server)
                log(f"[glotkit] {tag} model: EM {r['em']:.2f}  F1 {r['f1']:.2f}  (n={r['n']})")

        def train_stage():
            torch.manual_seed(recipe.seed)
            peft_model = apply_lora(model, recipe.lora)
            params = count_trainable(peft_model)
            log(f"[glotkit] {params.line()}")
            stats = EncodeStats()
            if pretraining:
                encoded = train_rows
            else:
                encoded = [e for ex in data.train
                           if (e := fmt.encode_train(ex, recipe.train.max_length, recipe.train.too_long, stats)) is not None]
            note = stats.line(recipe.train.max_length)
            if note:
                log(f"[glotkit] warning: {note}")
            result = train(peft_model, encoded, recipe.train, seed=recipe.seed, work_dir=train_dir,
                           pad_id=tok.pad_token_id, device=device, log=log, progress=progress, parallel=par)
            whole = par.trainable_state(peft_model) if par.sharded else None  # gathered by every process
            if not par.is_main:
                return peft_model
            save_adapter(peft_model, adapter_dir, state=whole)
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
            return peft_model

        if par.world > 1:  # train together first, then process 0 alone
            if todo[1]:
                model = train_stage()
            par.end()
            if not par.is_main:
                return run_dir
            todo[1] = False
            if par.sharded and (todo[0] or todo[2] or suite_todo):
                # the trained model is in pieces (its other parts left with the other processes):
                # process 0 loads it again, and the adapter from its folder
                del model
                model, tok, device = load_model(recipe.model, log=log)
        if todo[0]:
            if serve:
                evaluate(None, "base")
            elif hasattr(model, "peft_config"):
                with model.disable_adapter():
                    evaluate(model, "base")
            else:
                evaluate(model, "base")
        if todo[1]:
            model = train_stage()
        if todo[2]:
            if not adapter_dir.is_dir() and not serve:
                raise GlotkitError(f"{adapter_dir}: no adapter to evaluate; add 'train' to stages")
            if not serve and not hasattr(model, "peft_config"):
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter_dir))
            evaluate(model, "tuned")
        if suite_todo:
            _run_suite_stage(recipe, run_dir, None if serve else model, tok, device, log, progress)
    par.end()  # (when training was done before: the other processes leave process 0 the rest)
    if not par.is_main:
        return run_dir
    if "memory" in stages and _memory_pending(recipe, run_dir):
        _run_memory_stage(recipe, run_dir, log)
    if "report" in stages:
        path = write_report(run_dir, recipe)
        log(f"[glotkit] report: {path}")
    return run_dir


def _pretrain_rows(recipe: Recipe, docs, tok, log, write: bool = True):
    """Packed training rows and held-out rows (whole documents, up to the token budget)."""
    from glotkit.data.corpus import pack_documents, split_documents, tokenize_documents

    cfg = recipe.pretrain
    train_docs, held_docs = split_documents(docs, cfg.heldout_ratio, recipe.seed)
    held_tok, held_bytes, total = [], 0, 0
    for d, ids in zip(held_docs, tokenize_documents(held_docs, tok)):
        if cfg.max_heldout_tokens and total and total + len(ids) > cfg.max_heldout_tokens:
            break
        held_tok.append(ids[: cfg.max_heldout_tokens] if cfg.max_heldout_tokens else ids)
        # bytes of the text those tokens cover (a document cut by the budget counts only its part)
        covered = held_tok[-1] if len(held_tok[-1]) < len(ids) else None
        held_bytes += len((tok.decode(covered, skip_special_tokens=True) if covered else d.text).encode("utf-8"))
        total += len(held_tok[-1])
    train_tok = tokenize_documents(train_docs, tok)
    distinct = set().union(*map(set, train_tok), *map(set, held_tok)) if train_tok or held_tok else set()
    if write:
        atomic_write_json(recipe.run_dir() / "corpus.json", {
            "train_documents": len(train_docs), "train_tokens_all": sum(map(len, train_tok)),
            "heldout_documents": len(held_tok), "heldout_tokens": total, "heldout_bytes": held_bytes,
            "distinct_token_ids": len(distinct), "vocab_size": len(tok)})
    if cfg.max_train_tokens:
        kept, n = [], 0
        for ids in train_tok:
            if n >= cfg.max_train_tokens:
                break
            kept.append(ids[: cfg.max_train_tokens - n])
            n += len(kept[-1])
        train_tok = kept
    train_rows = pack_documents(train_tok, cfg.block_size)
    held_rows = pack_documents(held_tok, cfg.block_size)
    log(f"[glotkit] corpus: {len(train_docs)} train documents -> {sum(len(t) for t in train_tok)} tokens in "
        f"{len(train_rows)} rows of {cfg.block_size}; held out {len(held_tok)} documents, {total} tokens, {held_bytes} bytes")
    return train_rows, held_rows, held_bytes


def _suite_tasks(recipe: Recipe):
    from glotkit.eval.suite import get_tasks, load_task_file, parse_task_data, shared_data_root

    cfg = recipe.suite
    extra = [t for f in cfg.task_files for t in load_task_file(f)]
    tasks = get_tasks(cfg.tasks, extra)
    task_data = parse_task_data(cfg.task_data, tasks)
    root = Path(cfg.data_root) if cfg.data_root else shared_data_root()
    return tasks, task_data, root


def _suite_labels(recipe: Recipe) -> dict[str, str]:
    return {"base": f"{recipe.model.name} (base)", "tuned": f"{recipe.model.name} + {recipe.name} adapter"}


def _suite_pending(recipe: Recipe, run_dir: Path) -> bool:
    """Whether some (model, task, shots) of the suite has no result yet."""
    from glotkit.eval.suite import done_units, unit_key

    tasks, _, _ = _suite_tasks(recipe)  # also checks task names and files before any work
    done = done_units(run_dir / "suite" / "results.json")
    labels = _suite_labels(recipe)
    cfg = recipe.suite
    return any(unit_key(labels[m], t, k, cfg.mode, cfg.limit, cfg.seed) not in done
               for m in cfg.models for t in tasks for k in cfg.shots)


def _run_suite_stage(recipe: Recipe, run_dir: Path, model, tok, device: str, log, progress: bool) -> None:
    """The suite for each of ``suite.models``: on the local ``model`` (the adapter switched off for
    'base'), or on the server's models when ``generate.backend`` is 'openai' (``model`` is None)."""
    from glotkit.eval.suite import run_suite

    tasks, task_data, root = _suite_tasks(recipe)
    cfg = recipe.suite
    labels = _suite_labels(recipe)
    common = dict(shots=cfg.shots, seed=cfg.seed, mode=cfg.mode, limit=cfg.limit, batch_size=cfg.batch_size,
                  data_root=root, out_dir=run_dir / "suite", task_data=task_data, device=device, log=log,
                  progress=progress)
    if model is None:
        from glotkit.generate.server import ServerGenerator

        for m in cfg.models:
            server = ServerGenerator.connect(recipe.generate, m, log, f"task suite ({labels[m]})")
            run_suite(None, tok, tasks, model_label=labels[m], server=server, **common)
        return
    if "tuned" in cfg.models and not hasattr(model, "peft_config"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    for m in cfg.models:
        log(f"[glotkit] task suite: {labels[m]}, tasks {', '.join(t.name for t in tasks)}, shots {cfg.shots}, "
            f"limit {cfg.limit}")
        if m == "base" and hasattr(model, "peft_config"):
            with model.disable_adapter():
                run_suite(model, tok, tasks, model_label=labels[m], **common)
        else:
            run_suite(model, tok, tasks, model_label=labels[m], **common)


def _check_suite(recipe: Recipe) -> None:
    from glotkit.eval.suite import check_template, draw_shots, test_items

    tasks, task_data, root = _suite_tasks(recipe)
    for t in tasks:
        data = t.load(Path(task_data[t.name]) if t.name in task_data else root)
        items = test_items(t, data, recipe.suite.limit)
        if not items:
            raise GlotkitError(f"task '{t.name}': empty test split")
        check_template(t, items[0])
        draw_shots(data["train"], max(recipe.suite.shots), recipe.suite.seed, 0)


def _memory_pending(recipe: Recipe, run_dir: Path) -> bool:
    import json

    path = run_dir / "memory.json"
    if not path.is_file():
        return True
    return json.loads(path.read_text(encoding="utf-8")).get("settings") != recipe.memory.model_dump(mode="json")


def _run_memory_stage(recipe: Recipe, run_dir: Path, log) -> None:
    import json

    from glotkit.eval.memory import estimate_before_loading, measure, table, training_estimate

    cfg = recipe.memory
    log(f"[glotkit] memory: {', '.join(cfg.modes)}, each in a fresh process ({cfg.prompt_tokens}-token prompt)")
    est = estimate_before_loading(recipe.model.name)
    rows = measure(recipe.model.name, cfg.modes, cfg.prompt_tokens, cfg.new_tokens)
    corpus = run_dir / "corpus.json"
    keep = json.loads(corpus.read_text(encoding="utf-8"))["distinct_token_ids"] if corpus.is_file() else None
    out = {"settings": cfg.model_dump(mode="json"), "rows": rows, "estimate_before_loading": est.to_dict(),
           "trim_vocab_to": keep}
    tr = run_dir / "train" / "result.json"
    if tr.is_file():
        result = json.loads(tr.read_text(encoding="utf-8"))
        out["training"] = training_estimate(recipe, est, result)
    out["table"] = table(rows, keep_vocab=keep)
    atomic_write_json(run_dir / "memory.json", out)
    log("[glotkit] memory table:\n" + out["table"])
