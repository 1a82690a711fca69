"""Contextual QA with LoRA (MISSION.md system A; the demo): evaluate the base model on the test
questions, train an adapter with the loss on the answer only, evaluate the adapted model (EM/F1
with language-aware normalization), and optionally the task suite and the memory table."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from glotkit.config import DataSection, EvalSection, MemorySection, PromptSection, RecipeBase, SuiteSection
from glotkit.systems.base import Run, Verb
from glotkit.systems.finetune import FinetuneSystem, Kind


class QARecipe(RecipeBase):
    """A QA recipe: the shared sections plus data, prompt, eval, suite and memory."""

    system: Literal["qa"] = "qa"
    data: DataSection = Field(default_factory=DataSection)
    prompt: PromptSection = Field(default_factory=PromptSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    suite: SuiteSection = Field(default_factory=SuiteSection)
    memory: MemorySection = Field(default_factory=MemorySection)

    default_stages: ClassVar[tuple[str, ...]] = ("eval_base", "train", "eval_tuned", "report")
    all_stages: ClassVar[tuple[str, ...]] = ("eval_base", "train", "eval_tuned", "suite", "memory", "report")
    path_keys: ClassVar[tuple[tuple[str, str], ...]] = (
        ("data", "train"), ("data", "test"), ("suite", "data_root"), ("suite", "task_files"), ("suite", "task_data"))
    served: ClassVar[bool] = True

    def served_needs(self) -> list[tuple[str, str]]:
        needs = [("eval_base", "base"), ("eval_tuned", "tuned")] + [("suite", m) for m in self.suite.models]
        return list(dict.fromkeys((st, r) for st, r in needs if st in self.stages))


def _read(recipe: QARecipe, log) -> Any:
    from glotkit.data.qa import load_qa_data

    data = load_qa_data(recipe.data, recipe.seed)
    for w in data.warnings:
        log(f"warning: {w}")
    return data


def _describe(run: Run) -> str:
    return f"{len(run.checked.train)} train / {len(run.checked.test)} test examples"


def _prepare(run: Run, state) -> Any:
    from glotkit.data.prompts import PromptFormatter

    return PromptFormatter(run.recipe.prompt, state.tok, run.recipe.model.chat_template)


def _rows(run: Run, state, fmt) -> tuple[list, Any]:
    from glotkit.data.prompts import EncodeStats

    cfg, stats = run.recipe.train, EncodeStats()
    rows = [e for ex in run.checked.train if (e := fmt.encode_train(ex, cfg.max_length, cfg.too_long, stats)) is not None]
    return rows, stats


def _evaluate(run: Run, state, tag: str) -> None:
    from glotkit.eval.qa_eval import evaluate_qa

    recipe, log = run.recipe, run.log
    r = evaluate_qa(state.generator(run, tag, f"eval {tag}"), state.prepared, run.checked.test, recipe.eval,
                    language=recipe.data.language, out_dir=run.folder.eval_dir(tag), desc=f"eval {tag}", log=log,
                    progress=run.progress)
    log(f"{tag} model: EM {r['em']:.2f}  F1 {r['f1']:.2f}  (n={r['n']})")


def _fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _report(run: Run, metrics: dict) -> list[str]:
    from glotkit.eval.uncertainty import fmt
    from glotkit.systems.finetune import paired_change

    lines = ["", "## Test-set scores (%)", "",
             "| model | EM [95 % CI] | F1 [95 % CI] | EM raw | F1 raw | n |", "|---|---:|---:|---:|---:|---:|"]
    for tag, m in metrics.items():
        lines.append(f"| {tag} | {fmt(m['em'], m.get('em_ci'))} | {fmt(m['f1'], m.get('f1_ci'))} | {_fmt(m['em_raw'])} | "
                     f"{_fmt(m['f1_raw'])} | {m['n']} |")
    base, tuned = metrics.get("base"), metrics.get("tuned")
    if base and tuned:
        change = paired_change(run.folder, ("em", "f1"), {"em": "EM", "f1": "F1"})
        lines += ["", change or f"Change: EM {tuned['em'] - base['em']:+.2f}, F1 {tuned['f1'] - base['f1']:+.2f} points."]
    m0 = next(iter(metrics.values()), {})
    if m0.get("ci_method"):
        lines += ["", f"Intervals: {m0['ci_method']}."]
    lines += ["", "EM/F1 use language-aware normalization (NFC, Romanian cedilla → comma-below, case, "
              "Unicode punctuation, whitespace; English articles only for English); *raw* compares the "
              "stripped strings as generated."]
    return lines


KIND = Kind(
    read=_read, describe=_describe, prepare=_prepare, rows=_rows, evaluate=_evaluate,
    data_files=lambda r: [p for p in (r.data.train, r.data.test) if p], report=_report,
    loss_label="loss per answer token",
    train_note=lambda tr: f"- loss on answer tokens only, LM head at answer positions only: {tr['fast_loss']}",
    headline=("em", "f1", "em_raw", "f1_raw"))

SYSTEM = FinetuneSystem(
    name="qa", title="contextual QA with LoRA", schema=QARecipe, kind=KIND,
    verbs=(Verb("train", "only the training stage of a recipe", stages=("train",), launchable=True),))
