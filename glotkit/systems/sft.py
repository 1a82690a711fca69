"""Instruction and chat fine-tuning (``system: sft``): a LoRA adapter trained on conversations with
the loss on what the assistant writes, evaluated before and after on held-out conversations by
the loss per assistant token and by the answers the model generates (EM/F1 with language-aware
normalization, ROUGE-L).

Data in alpaca, sharegpt, OpenAI ``messages`` or prompt–completion form (:mod:`glotkit.data.chat`),
rendered with the tokenizer's chat template or ``chat.template`` (a base model has none); short
conversations packed into rows that never attend across conversations (``chat.pack``), or — unpacked —
a system prompt every conversation shares computed once per batch (``train.share_prefix``).
Run folder and stages are those of the other fine-tuning systems (:mod:`glotkit.systems.finetune`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, StrictInt, field_validator

from glotkit.config import EvalSection, MemorySection, RecipeBase, SuiteSection, _Section
from glotkit.errors import GlotkitError
from glotkit.languages import language_code
from glotkit.systems.base import Run, Verb
from glotkit.systems.finetune import FinetuneSystem, Kind

_FORMATS = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"]


class ChatDataSection(_Section):
    """Where the conversations come from and how to read and split them."""

    train: str | None = None  # JSONL, JSON, CSV/TSV, parquet, or a saved datasets folder
    test: str | None = None  # leave out to hold out data.test_ratio of train (seeded)
    format: _FORMATS = "auto"  # auto: told from the first record's fields (the log says which)
    # field names where they differ from the usual ones, e.g. {instruction: question, output: answer};
    # keys: instruction input output system conversations from value messages role content prompt completion id
    fields: dict[str, str] = Field(default_factory=dict)
    test_ratio: float = Field(0.2, gt=0.0, lt=1.0)
    language: str = "ro"  # answer normalization in EM/F1 (Romanian ş/ţ -> ș/ț; English articles)
    max_train: StrictInt | None = Field(None, gt=0)
    max_test: StrictInt | None = Field(None, gt=0)

    _language = field_validator("language")(classmethod(lambda cls, v: language_code(v)))

    @field_validator("fields")
    @classmethod
    def _known(cls, v: dict[str, str]) -> dict[str, str]:
        from glotkit.data.chat import DEFAULT_FIELDS

        bad = [k for k in v if k not in DEFAULT_FIELDS]
        if bad:
            raise ValueError(f"unknown field role '{bad[0]}' (roles: {', '.join(DEFAULT_FIELDS)})")
        return v


class ChatSection(_Section):
    """How conversations become training rows."""

    template: str | None = None  # a Jinja chat template file; default: the tokenizer's own
    loss: Literal["assistant", "last", "all"] = "assistant"  # every assistant turn | the last one | every token
    # short conversations share rows (attention and positions kept apart; same loss and gradients).
    # Off by default: on CPU, rows of one conversation with the shared system prompt computed once
    # per batch measured faster (README, "Instruction and chat fine-tuning")
    pack: bool = False


class SFTEvalSection(EvalSection):
    """Held-out evaluation: the loss per assistant token, and greedy answers to the last user turn."""

    max_new_tokens: StrictInt = Field(48, gt=0)


class SFTRecipe(RecipeBase):
    """An instruction/chat fine-tuning recipe: the shared sections plus data, chat, eval, suite, memory."""

    system: Literal["sft"] = "sft"
    data: ChatDataSection = Field(default_factory=ChatDataSection)
    chat: ChatSection = Field(default_factory=ChatSection)
    eval: SFTEvalSection = Field(default_factory=SFTEvalSection)
    suite: SuiteSection = Field(default_factory=SuiteSection)
    memory: MemorySection = Field(default_factory=MemorySection)

    default_stages: ClassVar[tuple[str, ...]] = ("eval_base", "train", "eval_tuned", "report")
    all_stages: ClassVar[tuple[str, ...]] = ("eval_base", "train", "eval_tuned", "suite", "memory", "report")
    path_keys: ClassVar[tuple[tuple[str, str], ...]] = (
        ("data", "train"), ("data", "test"), ("chat", "template"), ("suite", "data_root"), ("suite", "task_files"),
        ("suite", "task_data"))


class _Checked:
    """What the check read before any model is loaded: the data and the template text."""

    def __init__(self, data, template: str | None):
        self.data, self.template = data, template


def _read(recipe: SFTRecipe, log) -> _Checked:
    from glotkit.data.chat import load_chat_data, read_template

    d = recipe.data
    data = load_chat_data(d.train, d.test, d.format, d.fields, d.test_ratio, recipe.seed, d.max_train, d.max_test)
    if not data.train:
        raise GlotkitError(f"{d.train}: no training conversations left")
    template = read_template(recipe.chat.template) if recipe.chat.template else None
    if data.format == "prompt_completion" and recipe.chat.template:
        log("note: chat.template is not used for plain prompt–completion data")
    for w in data.warnings:
        log(f"warning: {w}")
    return _Checked(data, template)


def _describe(run: Run) -> str:
    from glotkit.data.chat import describe

    return describe(run.checked.data)


def _prepare(run: Run, state) -> Any:
    from glotkit.data.chat import ChatEncoder

    recipe = run.recipe
    enc = ChatEncoder(state.tok, run.checked.template, recipe.chat.loss)
    if any(c.is_chat for c in run.checked.data.train) and not enc.has_template:
        raise GlotkitError(f"model '{recipe.model.name}' has no chat template: give one with chat.template "
                           "(see recipes/templates/)")
    return enc


def _where(recipe: SFTRecipe, conv) -> str:
    return f"{recipe.data.train}: conversation {conv.id}: "


def _rows(run: Run, state, enc) -> tuple[list, Any]:
    from glotkit.data.chat import pack_examples
    from glotkit.data.prompts import EncodeStats

    recipe, stats = run.recipe, EncodeStats()
    examples = [e for c in run.checked.data.train
                if (e := enc.example(c, recipe.train.max_length, recipe.train.too_long, stats, _where(recipe, c)))]
    if not examples:
        raise GlotkitError(f"train.max_length={recipe.train.max_length}: every training conversation is longer")
    if recipe.chat.pack:
        rows = pack_examples(examples, recipe.train.max_length, recipe.seed)
        run.log(f"packed {len(examples)} conversations into {len(rows)} rows of at most {recipe.train.max_length} tokens")
        return rows, stats
    return examples, stats


def _evaluate(run: Run, state, tag: str) -> None:
    from glotkit.eval.chat_eval import evaluate_chat

    recipe = run.recipe
    test = run.checked.data.test
    test = test[: recipe.eval.limit] if recipe.eval.limit else test
    with (state.base() if tag == "base" else _tuned(state)) as model:
        r = evaluate_chat(model, state.generator(run, tag, f"eval {tag}"), state.prepared, test, recipe.eval,
                          language=recipe.data.language, out_dir=run.folder.eval_dir(tag), desc=f"eval {tag}",
                          log=run.log, progress=run.progress, max_length=recipe.train.max_length)
    run.log(f"{tag} model: loss per assistant token {r['nll_per_token']:.4f}; answers EM {r['em']:.2f}  "
            f"F1 {r['f1']:.2f}  ROUGE-L {r['rougeL']:.2f}  (n={r['n']})")


def _tuned(state):
    import contextlib

    return contextlib.nullcontext(state.tuned())


def _fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _report(run: Run, metrics: dict) -> list[str]:
    from glotkit.eval.uncertainty import fmt
    from glotkit.systems.finetune import paired_change

    lines = ["", "## Held-out conversations", "",
             "| model | loss per assistant token [95 % CI] | perplexity | EM [95 % CI] | F1 [95 % CI] | ROUGE-L [95 % CI] | n |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for tag, m in metrics.items():
        lines.append(f"| {tag} | {fmt(m['nll_per_token'], m.get('nll_per_token_ci'), 4)} | {_fmt(m['perplexity'], 3)} | "
                     f"{fmt(m['em'], m.get('em_ci'))} | {fmt(m['f1'], m.get('f1_ci'))} | "
                     f"{fmt(m['rougeL'], m.get('rougeL_ci'))} | {m['n']} |")
    base, tuned = metrics.get("base"), metrics.get("tuned")
    if base and tuned:
        lines += ["", f"Loss per assistant token: {tuned['nll_per_token'] - base['nll_per_token']:+.4f} (its interval: "
                  "bootstrap over conversations of the summed loss over their tokens)."]
        change = paired_change(run.folder, ("em", "f1", "rougeL"), {"em": "EM", "f1": "F1", "rougeL": "ROUGE-L"})
        lines += ["", change or f"Change: EM {tuned['em'] - base['em']:+.2f}, F1 {tuned['f1'] - base['f1']:+.2f}, "
                  f"ROUGE-L {tuned['rougeL'] - base['rougeL']:+.2f} points."]
    r = run.recipe
    lines += ["", f"The loss is over every assistant turn of the held-out conversations (the tokens the model "
              f"learns to write, end-of-turn marker included); the answers are greedy continuations of each "
              f"conversation up to its last assistant turn (at most {r.eval.max_new_tokens} new tokens, stopped "
              f"at the template's end of turn), scored against that turn with language-aware EM/F1 "
              f"(`{r.data.language}`) and ROUGE-L."]
    return lines


def _train_note(tr: dict) -> str:
    return f"- loss on assistant tokens only, LM head at those positions only: {tr['fast_loss']}"


KIND = Kind(
    read=_read, describe=_describe, prepare=_prepare, rows=_rows, evaluate=_evaluate,
    data_files=lambda r: [p for p in (r.data.train, r.data.test, r.chat.template) if p], report=_report,
    loss_label="loss per assistant token", train_note=_train_note,
    headline=("nll_per_token", "em", "f1", "rougeL"))

SYSTEM = FinetuneSystem(
    name="sft", title="instruction and chat fine-tuning", schema=SFTRecipe, kind=KIND,
    verbs=(Verb("train", "only the training stage of a recipe", stages=("train",), launchable=True),))
