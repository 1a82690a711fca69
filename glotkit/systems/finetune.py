"""The stages the QA and continued-pretraining systems share: evaluate the base model, train a
LoRA adapter, evaluate the adapted model, the task suite, the memory table, the report.

``runs/<name>/`` holds::

    config.yaml        the fully resolved recipe (a rerun with a different one is refused)
    versions.json      library versions and the device
    stages.json        what each finished stage was made from (settings, input-file hashes)
    eval_base/         predictions.jsonl + metrics.json of the base model
    train/             checkpoint.pt while training, log.jsonl (loss per step), result.json
    adapter/           the LoRA adapter in PEFT format (PeftModel.from_pretrained loads it)
    model/             (finetune: full) the whole tuned model, a Hugging Face folder, instead of adapter/
    eval_tuned/        predictions.jsonl + metrics.json of the adapted model
    suite/             the task suite for base and adapted model: results.json/.md/.png, predictions
    memory.json        the memory table (M1/M2 for fp32, bf16, NF4) with the static estimates
    corpus.json        (pretraining) document and token counts, distinct token ids of the corpus
    metrics.json       {"base": {...}, "tuned": {...}} (written by the evaluation stages)
    predictions.jsonl  per test example: question, gold, generations, answers, em/f1 of both
    report.md, loss.png

A system built on these stages (:class:`FinetuneSystem`) supplies what differs: its schema, how
it reads its data (:class:`Kind`), how training rows are made, how a model is evaluated, and
its part of the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from glotkit.config import RecipeBase
from glotkit.errors import GlotkitError
from glotkit.generate import served
from glotkit.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, new_figure, save_figure
from glotkit.systems.base import Run, RunFolder, Stage, Verb


class FinetuneFolder(RunFolder):
    """The paths of a fine-tuning run (see the module docstring)."""

    train_dir = property(lambda self: self.root / "train")
    train_result = property(lambda self: self.root / "train" / "result.json")
    train_log = property(lambda self: self.root / "train" / "log.jsonl")
    adapter = property(lambda self: self.root / "adapter")
    tuned_model = property(lambda self: self.root / "model", doc="finetune: full: the whole tuned model")
    suite = property(lambda self: self.root / "suite")
    suite_results = property(lambda self: self.root / "suite" / "results.json")
    memory = property(lambda self: self.root / "memory.json")
    corpus = property(lambda self: self.root / "corpus.json")
    metrics = property(lambda self: self.root / "metrics.json")
    predictions = property(lambda self: self.root / "predictions.jsonl")
    loss_png = property(lambda self: self.root / "loss.png")

    def eval_dir(self, tag: str) -> Path:
        return self.root / f"eval_{tag}"

    def eval_metrics(self, tag: str) -> Path:
        return self.eval_dir(tag) / "metrics.json"

    def eval_predictions(self, tag: str) -> Path:
        return self.eval_dir(tag) / "predictions.jsonl"


@dataclass
class Kind:
    """What a fine-tuning system does its own way."""

    read: Callable[[RecipeBase, Callable[[str], None]], Any]  # its data, read before any model is loaded
    describe: Callable[[Run], str]  # the line that opens the run's log
    prepare: Callable[[Run, Any], Any]  # with the tokenizer: what training rows and evaluation need
    rows: Callable[[Run, Any, Any], tuple[list, Any]]  # (training rows, encode stats) from what prepare made
    evaluate: Callable[[Run, "Loaded", str], None]  # (run, the loaded model, tag 'base'|'tuned'): eval_<tag>/metrics.json
    data_files: Callable[[RecipeBase], list[str]]  # the files its data comes from (their hashes make stages stale)
    report: Callable[[Run, dict], list[str]]  # its part of report.md, given the metrics
    loss_label: str = "loss per answer token"
    train_note: Callable[[dict], str] = lambda tr: "- loss on every token"
    headline: Sequence[str] = ()  # metric keys of eval_tuned that sweeps show


# --------------------------------------------------------------------------- the loaded model


@dataclass
class Loaded:
    """The model loaded once per process for the run's stages, its tokenizer, and what the system
    prepared with it.  ``model`` is None when servers generate (the tokenizer is enough).  With
    full fine-tuning (``full``) there is no adapter to switch off: the base and the tuned model
    are two sets of weights, and the one asked for is loaded in place of the other."""

    model: Any
    tok: Any
    device: str
    prepared: Any
    adapter: Path  # the run's adapter folder (full fine-tuning: the tuned model's folder)
    dropped: bool = False  # the model was let go after sharded training (reloaded on next use)
    full: Any = None  # full fine-tuning: the recipe's model section (to load the base again)
    holds_tuned: bool = False  # full fine-tuning: self.model holds the tuned weights

    def _load(self, name: str) -> None:
        from glotkit.models.loading import load_model

        cfg = self.full if name == "base" else self.full.model_copy(update={"name": str(self.adapter)})
        self.model = None  # (one copy in memory at a time)
        self.model, _, self.device = load_model(cfg, log=lambda m: None)
        self.holds_tuned = name == "tuned"

    def base(self):
        """The model with its adapter switched off (a context manager yielding it)."""
        import contextlib

        if self.full is not None:
            if self.holds_tuned or self.model is None:
                self._load("base")
            return contextlib.nullcontext(self.model)
        if self.model is not None and hasattr(self.model, "peft_config"):
            @contextlib.contextmanager
            def off():
                with self.model.disable_adapter():
                    yield self.model
            return off()
        return contextlib.nullcontext(self.model)

    def tuned(self):
        """The model with the run's adapter: the one trained in this process, or loaded from its folder."""
        if self.full is not None:
            if not self.holds_tuned:
                self._load("tuned")
            return self.model
        if self.model is not None and not hasattr(self.model, "peft_config"):
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(self.adapter))
        return self.model

    def generator(self, run: Run, role: str, what: str):
        """The generator of role 'base' (the adapter switched off) or 'tuned': the served model
        of that role with ``generate.backend: openai``, else this one."""
        from glotkit.generate import for_role
        from glotkit.generate.local import LocalGenerator

        def local():
            if self.full is not None:  # two sets of weights: the one asked for is loaded
                if role == "tuned":
                    return LocalGenerator(self.tuned(), self.tok, self.device)
                with self.base() as model:
                    return LocalGenerator(model, self.tok, self.device)
            model = self.tuned() if role == "tuned" else self.model
            return LocalGenerator(model, self.tok, self.device, adapter_off=role == "base")

        return for_role(run.recipe.generate, role, local, tokenizer=self.tok, log=run.log, what=what)


def tuned_dir(recipe, folder: "FinetuneFolder") -> Path:
    """Where the run's tuned weights are: the adapter, or the whole model (finetune: full)."""
    return folder.tuned_model if recipe.finetune == "full" else folder.adapter


def _tuned_file(recipe, folder: "FinetuneFolder") -> Path:
    return folder.tuned_model / "model.safetensors" if recipe.finetune == "full" else \
        folder.adapter / "adapter_model.safetensors"


def _served_only(run: Run) -> bool:
    """Whether servers answer for every model the stages ask for (no local model is needed)."""
    needs = run.recipe.served_needs()
    return bool(needs) and all(served(run.recipe.generate, role) for _, role in needs)


def _training_pending(run: Run) -> bool:
    return "train" in run.recipe.stages and not run.folder.train_result.is_file()


def loaded(run: Run, kind: Kind) -> Loaded:
    """The run's model (loaded on first use; seeded first), the tokenizer, and what the system
    prepares with it.  With ``generate.backend: openai`` and no training left, only the tokenizer."""
    state = run.shared.get("loaded")
    if state is not None:
        if state.model is None and state.dropped:  # dropped after sharded training: load it whole again
            from glotkit.models.loading import load_model

            state.model, state.tok, state.device = load_model(run.recipe.model, log=run.log)
        return state
    import torch

    from glotkit.models.loading import load_model, tokenizer_for

    recipe, par = run.recipe, run.parallel
    torch.manual_seed(recipe.seed)
    with par.main_first():  # a built-in model is converted once, by process 0
        if _served_only(run) and not _training_pending(run):  # servers generate and score: the tokenizer is enough
            model, device, tok = None, "cpu", tokenizer_for(recipe.model, log=run.log)
        else:
            model, tok, device = load_model(recipe.model, log=run.log)
    if par.is_main:
        from glotkit.systems.runner import versions

        atomic_write_json(run.folder.versions, versions(device) | {"processes": par.world})
    full = recipe.model if recipe.finetune == "full" else None
    state = Loaded(model, tok, device, None, tuned_dir(recipe, run.folder), full=full)
    state.prepared = kind.prepare(run, state)
    run.shared["loaded"] = state
    return state


# --------------------------------------------------------------------------- stages


def model_inputs(recipe) -> list[Path]:
    """The model as an input of a stage: a local folder's files are hashed (weights replaced in
    place make the stages that used them stale).  A built-in model is pinned by its sha256 in the
    registry and a hub id by ``model.revision``, both part of the recipe."""
    path = Path(recipe.model.name).expanduser()
    return [path] if path.is_dir() else []


def _eval_stage(kind: Kind, tag: str) -> Stage:
    def run_(run: Run) -> None:
        f: FinetuneFolder = run.folder
        if tag == "tuned" and not tuned_dir(run.recipe, f).is_dir() and not served(run.recipe.generate, "tuned"):
            raise GlotkitError(f"{tuned_dir(run.recipe, f)}: no tuned model to evaluate; add 'train' to stages")
        kind.evaluate(run, loaded(run, kind), tag)
        write_merged_results(f)

    def inputs(run: Run) -> list[Path]:
        files = [Path(p) for p in kind.data_files(run.recipe)] + model_inputs(run.recipe)
        if tag == "tuned":
            files.append(_tuned_file(run.recipe, run.folder))
        return files

    return Stage(f"eval_{tag}", run_, done=lambda run: run.folder.eval_metrics(tag).is_file(), inputs=inputs,
                 outputs=lambda run: [run.folder.eval_dir(tag)],
                 metrics=lambda run: run.folder.read_json(run.folder.eval_metrics(tag)))


def _train_stage(kind: Kind) -> Stage:
    def run_(run: Run) -> None:
        import torch

        from glotkit.models.lora import trainable
        from glotkit.train.engine import train_adapter

        recipe, par, f = run.recipe, run.parallel, run.folder
        state = loaded(run, kind)
        torch.manual_seed(recipe.seed)
        if state.full is not None and state.holds_tuned:
            state._load("base")
        peft_model = trainable(state.model, recipe.finetune, recipe.lora)
        rows, stats = kind.rows(run, state, state.prepared)
        note = stats.line(recipe.train.max_length)
        if note:
            run.log(f"warning: {note}")
        encode = {"total": stats.total, "kept": stats.kept, "truncated": stats.truncated, "dropped": stats.dropped}
        train_adapter(peft_model, rows, recipe.train, what="train", out=tuned_dir(recipe, f), work_dir=f.train_dir,
                      seed=recipe.seed, pad_id=state.tok.pad_token_id, device=state.device, log=run.log,
                      progress=run.progress, info={"encode": encode, "finetune": recipe.finetune}, parallel=par,
                      tokenizer=state.tok, on_log=tracker.step if (tracker := run.shared.get("tracker")) else None)
        state.model = peft_model
        if state.full is not None:
            state.model.requires_grad_(False)
            state.holds_tuned = True
        elif recipe.lora.changes_base() and recipe.finetune == "lora":
            # PiSSA/OLoRA left the residual in the base weights: the base model and the saved
            # (converted) adapter are loaded afresh for the stages that follow
            state.model, state.dropped = None, True
        elif par.world > 1 and par.sharded:
            # the trained model is in pieces (its other parts left with the other processes):
            # process 0 loads it again for the other stages, and the adapter from its folder
            state.model, state.dropped = None, True

    return Stage("train", run_, done=lambda run: run.folder.train_result.is_file(),
                 metrics=lambda run: run.folder.read_json(run.folder.train_result),
                 inputs=lambda run: [Path(p) for p in kind.data_files(run.recipe)] + model_inputs(run.recipe),
                 outputs=lambda run: [run.folder.train_dir, tuned_dir(run.recipe, run.folder)], every_process=True)


def _suite_stage(kind: Kind) -> Stage:
    def run_(run: Run) -> None:
        state = loaded(run, kind)
        run_suite_stage(run, state)

    return Stage("suite", run_, done=lambda run: not suite_pending(run.recipe, run.folder))


def _memory_stage() -> Stage:
    return Stage("memory", run_memory_stage, done=lambda run: not _memory_pending(run.recipe, run.folder))


def _report_stage(kind: Kind) -> Stage:
    def run_(run: Run) -> None:
        path = write_report(run, kind)
        run.log(f"report: {path}")

    return Stage("report", run_)


def stages(kind: Kind) -> list[Stage]:
    return [_eval_stage(kind, "base"), _train_stage(kind), _eval_stage(kind, "tuned"), _suite_stage(kind),
            _memory_stage(), _report_stage(kind)]


# --------------------------------------------------------------------------- the suite


def _suite_tasks(recipe):
    from glotkit.eval.suite import resolve_suite

    return resolve_suite(recipe.suite)


def _suite_labels(recipe) -> dict[str, str]:
    return {"base": f"{recipe.model.name} (base)", "tuned": f"{recipe.model.name} + {recipe.name} adapter"}


def suite_pending(recipe, folder: FinetuneFolder) -> bool:
    """Whether some (model, task, shots) of the suite has no result yet."""
    from glotkit.eval.suite import done_units, unit_key

    tasks, _, _ = _suite_tasks(recipe)  # also checks task names and files before any work
    done = done_units(folder.suite_results)
    labels = _suite_labels(recipe)
    cfg = recipe.suite
    return any(unit_key(labels[m], t, k, cfg.mode, cfg.limit, cfg.seed, cfg.shot_seeds) not in done
               for m in cfg.models for t in tasks for k in cfg.shots)


def check_suite(recipe, folder: FinetuneFolder) -> None:
    """Bad task names, templates or shots fail before any model is loaded (and before training)."""
    from glotkit.eval.suite import check_template, draw_shots, test_items

    if "suite" not in recipe.stages or not suite_pending(recipe, folder):
        return
    tasks, task_data, root = _suite_tasks(recipe)
    for t in tasks:
        data = t.load(Path(task_data[t.name]) if t.name in task_data else root)
        items = test_items(t, data, recipe.suite.limit)
        if not items:
            raise GlotkitError(f"task '{t.name}': empty test split")
        check_template(t, items[0])
        draw_shots(data["train"], max(recipe.suite.shots), recipe.suite.seed, 0)
    if ("tuned" in recipe.suite.models and not ("train" in recipe.stages and not folder.train_result.is_file())
            and not tuned_dir(recipe, folder).is_dir() and not served(recipe.generate, "tuned")):
        raise GlotkitError(f"{tuned_dir(recipe, folder)}: no tuned model for the suite's 'tuned' model; add 'train' "
                           "to stages or set suite.models: [base]")


def run_suite_stage(run: Run, state: Loaded) -> None:
    """The suite for each of ``suite.models``: 'base' (the adapter switched off) and 'tuned', on
    the local model or on the server's model of that role."""
    from glotkit.eval.suite import run_suite_for

    labels = _suite_labels(run.recipe)
    models = [(labels[m], lambda m=m: state.generator(run, m, f"task suite ({labels[m]})")) for m in run.recipe.suite.models]
    run_suite_for(run.recipe.suite, models, run.folder.suite, log=run.log, progress=run.progress)


# --------------------------------------------------------------------------- memory


def _memory_pending(recipe, folder: FinetuneFolder) -> bool:
    mem = folder.read_json(folder.memory)
    return mem is None or mem.get("settings") != recipe.memory.model_dump(mode="json")


def run_memory_stage(run: Run) -> None:
    from glotkit.eval.memory import estimate_before_loading, measure, table, training_estimate

    recipe, f, log = run.recipe, run.folder, run.log
    cfg = recipe.memory
    log(f"memory: {', '.join(cfg.modes)}, each in a fresh process ({cfg.prompt_tokens}-token prompt)")
    est = estimate_before_loading(recipe.model.name)
    rows = measure(recipe.model.name, cfg.modes, cfg.prompt_tokens, cfg.new_tokens)
    corpus = f.read_json(f.corpus)
    keep = corpus["distinct_token_ids"] if corpus else None
    out = {"settings": cfg.model_dump(mode="json"), "rows": rows, "estimate_before_loading": est.to_dict(),
           "trim_vocab_to": keep}
    result = f.read_json(f.train_result)
    if result:
        out["training"] = training_estimate(recipe, est, result, row_tokens=run_row_tokens(recipe))
    out["table"] = table(rows, keep_vocab=keep)
    atomic_write_json(f.memory, out)
    log("memory table:\n" + out["table"])


def run_row_tokens(recipe) -> int:
    """Tokens in a training row: the packing block of continued pretraining, else train.max_length."""
    return recipe.pretrain.block_size if hasattr(recipe, "pretrain") else recipe.train.max_length


# --------------------------------------------------------------------------- results and report


def write_merged_results(f: FinetuneFolder) -> None:
    """``metrics.json`` ({"base", "tuned"}) and ``predictions.jsonl`` (one line per test example
    with both models' answers) from the evaluation stages' outputs."""
    base, tuned = f.read_json(f.eval_metrics("base")), f.read_json(f.eval_metrics("tuned"))
    metrics = {k: v for k, v in (("base", base), ("tuned", tuned)) if v is not None}
    atomic_write_json(f.metrics, metrics)
    base_p = {r["id"]: r for r in f.read_jsonl(f.eval_predictions("base"))}
    tuned_p = {r["id"]: r for r in f.read_jsonl(f.eval_predictions("tuned"))}
    if not base_p and not tuned_p:
        return
    merged = []
    for i in list(tuned_p or base_p):
        src = tuned_p.get(i) or base_p.get(i)
        row = {"id": i, "question": src["question"], "gold": src["gold"]}
        if "context_id" in src:
            row["context_id"] = src["context_id"]
        for tag, table in (("base", base_p), ("tuned", tuned_p)):
            if i in table:
                r = table[i]
                row[tag] = {k: r[k] for k in ("generation", "prediction", "em", "f1", "em_raw", "f1_raw", "rougeL")
                            if k in r}
        merged.append(row)
    atomic_write_jsonl(f.predictions, merged)


def paired_change(folder: FinetuneFolder, keys: Sequence[str], names: dict[str, str]) -> str:
    """One line: tuned − base of each score on the same test items, with its paired bootstrap
    interval (over contexts where the items carry one), marked * when the interval excludes 0."""
    from glotkit.eval.uncertainty import fmt_change, method, paired_difference

    rows = [r for r in folder.read_jsonl(folder.predictions) if "base" in r and "tuned" in r]
    if len(rows) < 2:
        return ""
    clusters = [r["context_id"] for r in rows] if all("context_id" in r for r in rows) else None
    parts = []
    for k in keys:
        if not all(k in r["base"] and k in r["tuned"] for r in rows):
            continue
        d = paired_difference([100 * r["base"][k] for r in rows], [100 * r["tuned"][k] for r in rows], clusters)
        parts.append(f"{names.get(k, k)} {fmt_change(d)}")
    unit = "contexts" if clusters is not None else "items"
    return (f"Change, tuned − base on the same {len(rows)} items: " + ", ".join(parts) + f" points (paired "
            f"{method(unit)}; * the interval excludes 0).")


def plot_loss(log: list[dict], path: Path, title: str = "training loss", ylabel: str = "loss per answer token") -> Path | None:
    if not log:
        return None
    fig, ax = new_figure()
    ax.plot([h["step"] for h in log], [h["loss"] for h in log], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(run: Run, kind: Kind) -> Path:
    """report.md: the system's scores, training, generation speed, sample predictions, the task
    suite, the memory table and the environment; it only reads the stages' outputs."""
    recipe, f = run.recipe, run.folder
    if not f.metrics.is_file():
        write_merged_results(f)  # a run folder from before the evaluation stages wrote it
    metrics = f.read_json(f.metrics) or {}
    tr = f.read_json(f.train_result)
    versions = f.read_json(f.versions) or {}
    merged = f.read_jsonl(f.predictions)
    png = plot_loss(f.read_jsonl(f.train_log), f.loss_png, f"{recipe.name}: {kind.loss_label}", kind.loss_label)

    lines = [f"# glotkit run `{recipe.name}`", ""]
    quant = " (NF4, QLoRA)" if recipe.model.quantization == "nf4" else ""
    how = "full fine-tuning (every weight)" if recipe.finetune == "full" else \
        f"LoRA r={recipe.lora.r}, alpha={recipe.lora.resolved_alpha():g}, targets {recipe.lora.target_modules}"
    lines.append(f"Model `{recipe.model.name}`{quant} on {versions.get('device', '?')}; {how}; "
                 f"language `{language_of(recipe)}`.")
    lines += kind.report(run, metrics)
    if tr:
        lines += ["", "## Training", "",
                  f"- {tr['trainable_line']}",
                  f"- {tr['steps']} steps over {tr['examples']} examples "
                  f"(encoding: {tr['encode']['truncated']} truncated, {tr['encode']['dropped']} dropped as too long)",
                  f"- {tr['seconds']:.0f} s, **{tr['tokens_per_s']:.0f} tokens/s** "
                  f"({tr['supervised_tokens_per_s']:.0f} supervised tokens/s), final loss {tr['final_loss']}",
                  f"- peak memory: {', '.join(f'{k} {v:.0f}' for k, v in tr['memory'].items())}",
                  kind.train_note(tr)]
        if png:
            lines += ["", "![training loss](loss.png)"]
    gen = [(t, m) for t, m in metrics.items() if "examples_per_s" in m]
    if gen:
        lines += ["", "## Generation", ""]
    for tag, m in gen:
        lines.append(f"- generation ({tag}): {m['examples_per_s']:.2f} examples/s, "
                     f"{m['generated_tokens_per_s']:.1f} new tokens/s, {m['seconds']:.0f} s")
    changed = [r for r in merged if "base" in r and "tuned" in r and r["base"]["prediction"] != r["tuned"]["prediction"]]
    if changed:
        lines += ["", "## Sample predictions", "", "| question | gold | base | tuned |", "|---|---|---|---|"]
        for r in changed[:8]:
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:80]  # noqa: E731
            lines.append(f"| {cell(r['question'])} | {cell(r['gold'][0])} | {cell(r['base']['prediction'])} | "
                         f"{cell(r['tuned']['prediction'])} |")
    lines += _suite_section(f) + _memory_section(f)
    lines += ["", "## Environment", "", "```", json.dumps(versions, indent=1), "```", ""]
    atomic_write_text(f.report, "\n".join(lines))
    return f.report


def language_of(recipe) -> str:
    return recipe.pretrain.language if hasattr(recipe, "pretrain") else recipe.data.language


def _suite_section(f: FinetuneFolder) -> list[str]:
    results = f.read_json(f.suite_results)
    if not results:
        return []
    from glotkit.eval.suite import suite_table

    r0 = results[0]
    items = "all test items" if r0["limit"] is None else f"the first {r0['limit']} test items (seeded order)"
    secs = sum(r.get("seconds", 0) for r in results)
    return ["", "## Task suite (base vs adapted)", "",
            f"Main metric of each task ×100; seed {r0['seed']}, batch size {r0['batch_size']}, "
            f"{items}; "
            f"{secs / 60:.1f} min in all. Mode 'loglik': the most likely option (classification, multiple "
            "choice) or the expected score 0–5 (STS); 'generate': greedy generation parsed by the task. "
            "Every figure, its template and predictions are in suite/.", "", suite_table(results), "",
            "![task suite](suite/results.png)"]


def _memory_section(f: FinetuneFolder) -> list[str]:
    mem = f.read_json(f.memory)
    if not mem:
        return []
    est = mem["estimate_before_loading"]
    lines = ["", "## Memory", "", mem["table"], "",
             f"M1: resident memory after loading; M2: peak while generating from a {mem['rows'][0].get('prompt_tokens', '~1000')}"
             "-token prompt; each mode in a fresh process; CPU figures are RSS (CUDA: max allocated). "
             f"Estimates come from the config alone (the model built on the meta device): "
             f"{est['linear_params']:,} parameters in linear layers, {est['other_params']:,} others, of which the "
             f"embedding {est['embedding_params']:,} ({est['vocab_size']:,} × {est['hidden_size']})."]
    if mem.get("trim_vocab_to"):
        lines.append(f"The trimmed-vocabulary column keeps the {mem['trim_vocab_to']:,} token ids the training corpus uses.")
    t = mem.get("training")
    if t:
        meas = t["measured_peak_rss_mb"]
        gap = f", measured peak RSS {meas:.0f} MB ({meas / t['estimate_mb']:.2f}× the estimate; RSS also holds " \
              "the Python/torch runtime)" if meas else ""
        lines += ["", f"Training ({t['mode']}, {t['tokens_per_forward']} tokens per forward pass), estimate: weights "
                  f"{t['weights_mb']:.0f} + LoRA with AdamW state {t['lora_and_adam_mb']:.0f} + activations "
                  f"{t['activations_mb']:.0f} + LM head {t['lm_head_mb']:.0f} = **{t['estimate_mb']:.0f} MB**{gap}."]
    return lines


# --------------------------------------------------------------------------- the system


_NEUTRAL = ("eval.batch_size",)
_REDONE = ("suite.", "memory.")


@dataclass
class FinetuneSystem:
    """A system made of the fine-tuning stages (QA, continued pretraining)."""

    name: str
    title: str
    schema: type[RecipeBase]
    kind: Kind
    verbs: Sequence[Verb] = ()
    folder_type: type[RunFolder] = FinetuneFolder
    result_neutral: Sequence[str] = _NEUTRAL
    redone_by_settings: Sequence[str] = _REDONE
    multi_process: bool = True
    extra: dict = field(default_factory=dict)

    def stages(self, recipe: RecipeBase) -> list[Stage]:
        return stages(self.kind)

    def check(self, recipe: RecipeBase, folder: FinetuneFolder, log) -> Any:
        data = self.kind.read(recipe, log)
        check_suite(recipe, folder)
        return data

    def describe(self, run: Run) -> str:
        return self.kind.describe(run)

    def item_scores(self, folder: FinetuneFolder) -> dict[str, Any] | None:
        """The tuned model's per-item scores (×100) of its evaluation, by item id, and the cluster
        of each (QA: the context): what a sweep compares trials on, paired."""
        rows = folder.read_jsonl(folder.eval_predictions("tuned"))
        keys = [k for k in self.kind.headline if rows and all(isinstance(r.get(k), (int, float)) for r in rows)]
        if not keys or not all("id" in r for r in rows):
            return None
        return {"ids": [r["id"] for r in rows], "clusters": [r.get("context_id") for r in rows],
                "scores": {k: [100 * float(r[k]) for r in rows] for k in keys}}

    def summary(self, folder: FinetuneFolder) -> dict[str, Any]:
        tuned = folder.read_json(folder.eval_metrics("tuned"))
        if not tuned:
            return {}
        base = folder.read_json(folder.eval_metrics("base")) or {}
        tr = folder.read_json(folder.train_result) or {}
        out: dict[str, Any] = {"trainable_params": tr.get("trainable_params"),
                               "trainable_percent": tr.get("trainable_percent")}
        out |= {k: tuned.get(k) for k in self.kind.headline}
        out |= {f"{k}_ci": tuned[f"{k}_ci"] for k in self.kind.headline if tuned.get(f"{k}_ci")}
        out |= {f"base_{k}": base.get(k) for k in self.kind.headline}
        out |= {"train_seconds": tr.get("seconds"), "tokens_per_s": tr.get("tokens_per_s")}
        return out
