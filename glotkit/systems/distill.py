"""DistilledGemma on HIPE-2026 (MISSION.md system D, ``system: distill``): prompt comparison -> teacher -> traces ->
students -> the efficiency–accuracy table.

``runs/<name>/``::

    split/{train,dev,test}.jsonl   the gold documents of each split, holding only the sampled pairs
    split/summary.json             documents and pairs per language and split
    compare/<model>--<format>/     dev-split predictions, answers and result.json; compare/table.md
    teacher/adapter/               the teacher's LoRA adapter (trained on the gold train labels)
    traces/explanations.jsonl      the teacher's explanation of each gold label (appended, resumable)
    traces/traces.jsonl            each explanation checked: the teacher's own answer after it,
                                   without the gold label in the prompt; kept when it equals gold
    traces/summary.json            kept / written per language and label
    students/<name>/model/         a trimmed-vocabulary copy of the base (students with trim_vocab)
    students/<name>/adapter/       the student's LoRA adapter (trained on the kept traces)
    evaluate/<model>/              test-split predictions (official format, one file per language)
    evaluate/table.json, table.md  scores, size, memory, speed and ranks
    report.md

The test split is a seeded split by document of the gold files: no test document is trained on
or used to pick prompts (the dev split is a second, disjoint set of documents).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import Field, StrictInt, field_validator

from glotkit.config import RecipeBase, _Section, folder_name
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from glotkit.io import read_jsonl as _read_jsonl
from glotkit.logs import say
from glotkit.systems.base import Run, RunFolder, Stage, Tool, Verb


class DistillStudent(_Section):
    """A student: a model (built-in name, folder or hub id), optionally with its vocabulary cut
    to the tokens the training texts use (``trim_vocab``: the teacher's own base, made smaller)."""

    name: str  # a label for tables and folders
    model: str
    trim_vocab: bool = False

    _plain = field_validator("name")(classmethod(lambda cls, v: folder_name(v)))


class DistillSection(_Section):
    """HIPE-2026 person–place relations by distillation (``task: distill``): prompt comparison,
    a LoRA teacher and its explanations of the gold labels, students trained on them."""

    data: list[str] = Field(default_factory=list)  # gold HIPE-2026 JSONL files (one per language)
    schema_file: str | None = None  # the release's JSON schema; null: the one in ../shared/data/hipe-2026
    silver: list[str] = Field(default_factory=list)  # more training documents (e.g. the sandbox/ files)
    silver_pairs: StrictInt = Field(0, ge=0)  # silver pairs per language added to the teacher's training
    test_ratio: float = Field(0.3, gt=0.0, lt=1.0)  # documents held out for the final table
    dev_ratio: float = Field(0.15, ge=0.0, lt=1.0)  # documents for the prompt comparison
    train_pairs: StrictInt | None = Field(64, gt=0)  # seeded sample of pairs per language; null: all
    dev_pairs: StrictInt | None = Field(8, gt=0)
    test_pairs: StrictInt | None = Field(48, gt=0)
    max_chars: StrictInt = Field(1200, ge=200)  # article excerpt around the mentions
    label_tokens: StrictInt = Field(32, gt=0)  # new tokens for a label-only answer
    explain_tokens: StrictInt = Field(128, gt=0)  # ... for explanation + answer
    batch_size: StrictInt = Field(16, gt=0)  # generation batch
    # how a model's labels are decided: "loglik" scores the five valid (at, isAt) combinations after
    # "Answer:" and takes the likeliest (no parse failure by construction; explanations stay free
    # text); "generate" generates the answer and parses it (for served models that cannot score options)
    labels: Literal["loglik", "generate"] = "loglik"
    # the prompt: "pair" (an excerpt around the pair's mentions, then the pair) or "article" (an
    # excerpt around all the document's pairs first and the pair last: a document's pairs share
    # their prompt's start, which training computes once per document)
    # "marked": the definitions first, then an excerpt centred where the pair's person and place
    # come closest with their mentions marked <person>…</person> / <place>…</place>, then the pair
    # "facts": as marked, with one sentence after the excerpt of where the whole article mentions
    # the pair (how often each, how many words apart at their closest, one sentence or not)
    prompt_layout: Literal["pair", "article", "marked", "facts"] = "pair"
    # the teacher's label imbalance (most gold pairs are FALSE/FALSE): "oversample" repeats the
    # pairs of each (at, isAt) combination round(sqrt(largest / its count)) times
    balance: Literal["none", "oversample"] = "none"
    # score the teacher on the dev split at the end of every epoch (teacher/curve.jsonl and the
    # report): the curve that says whether more epochs help; costs one dev labelling per epoch
    dev_curve: bool = False
    # calibrate each model's label decision on the dev split before the test: offsets added to the
    # five option scores, fit to the dev score (glotkit.hipe.predict.fit_offsets; loglik labels only)
    calibrate: bool = False
    compare_models: list[str] = Field(default_factory=lambda: ["gemma-3-270m", "smollm2-135m-instruct"])
    compare_formats: list[Literal["json", "explain-json", "plain", "explain-plain"]] = Field(
        default_factory=lambda: ["json", "explain-json", "plain", "explain-plain"])
    teacher_format: Literal["json", "plain"] = "json"  # what the teacher learns from gold (no explanations there)
    student_format: Literal["explain-json", "explain-plain"] = "explain-json"
    # who writes the explanations of the gold labels: the teacher's base model with its adapter
    # switched off (a small teacher tuned on label-only answers answers with labels when asked
    # to explain), or the tuned teacher itself; the tuned teacher checks them in both cases
    explain_with: Literal["base", "teacher"] = "base"
    # keep a trace only when its explanation names the person and the place and quotes or
    # paraphrases the article (glotkit.hipe.rationale); false: count these, keep regardless
    trace_check: bool = True
    # how many training pairs per language the teacher explains: a seeded sample spread evenly
    # over the (at, isAt) combinations (most gold pairs are FALSE/FALSE, and a trace set of mostly
    # FALSE/FALSE teaches the students little); null: every training pair
    trace_pairs: StrictInt | None = Field(None, gt=0)
    students: list[DistillStudent] = Field(default_factory=lambda: [
        DistillStudent(name="smollm2", model="smollm2-135m-instruct"),
        DistillStudent(name="gemma-trimmed", model="gemma-3-270m", trim_vocab=True)])
    level: Literal["response", "logits"] = "response"  # logits: needs one vocabulary for teacher and student
    student_epochs: float | None = Field(None, gt=0.0)  # null: train.epochs
    student_lr: float | None = Field(None, gt=0.0)  # null: train.lr
    untuned: bool = True  # also evaluate the untuned teacher and students (their best compared format)
    within_points: float = Field(3.0, gt=0.0)  # the seed's question: student within this many points


class DistillRecipe(RecipeBase):
    """A distillation recipe: the shared sections (the teacher's base model, its LoRA, the
    training loop) plus distill."""

    system: Literal["distill"] = "distill"
    distill: DistillSection = Field(default_factory=DistillSection)

    default_stages: ClassVar[tuple[str, ...]] = ("compare", "teacher", "traces", "student", "evaluate", "report")
    all_stages: ClassVar[tuple[str, ...]] = default_stages
    path_keys: ClassVar[tuple[tuple[str, str], ...]] = (("distill", "data"), ("distill", "silver"),
                                                        ("distill", "schema_file"))
    served: ClassVar[bool] = True

    def served_roles(self) -> list[str]:
        distill_cfg = self.distill
        return (["base", "teacher"]
                + [r for st in distill_cfg.students for r in (f"student.{st.name}", f"student.{st.name}.base")]
                + [self.compare_role(m) for m in distill_cfg.compare_models if m != self.model.name])

    def compare_role(self, model: str) -> str:
        """The served role of a compared model: the teacher's base model is ``base``."""
        return "base" if model == self.model.name else f"compare.{model}"

    def served_needs(self) -> list[tuple[str, str]]:
        distill_cfg = self.distill
        needs = [("compare", self.compare_role(m)) for m in distill_cfg.compare_models]
        # the evaluation's rows are served where their role has a served name, else labelled
        # locally (with their own memory measured): serve the teacher, measure the students
        needs += [("traces", "teacher"), ("traces", distill_cfg.explain_with)]
        return list(dict.fromkeys((st, r) for st, r in needs if st in self.stages))



SPLITS = ("train", "dev", "test")


# --------------------------------------------------------------------------- data


def _read(recipe: DistillRecipe, path: str) -> list[dict]:
    from glotkit.hipe.data import read_hipe

    return read_hipe(path, schema=recipe.distill.schema_file or "default")


def _by_language(docs: Sequence[dict], where: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        lang = d.get("language")
        if not lang:
            raise GlotkitError(f"{where}: document '{d.get('document_id')}' has no language")
        out.setdefault(lang, []).append(d)
    return out


def _sample_pairs(docs: Sequence[dict], limit: int | None, seed: int) -> list[dict]:
    """The documents holding a seeded sample of ``limit`` of their pairs (all when None), in order."""
    keys = [(i, j) for i, d in enumerate(docs) for j in range(len(d["sampled_pairs"]))]
    if limit is not None and limit < len(keys):
        keys = set(random.Random(seed).sample(keys, limit))
    else:
        keys = set(keys)
    out = []
    for i, d in enumerate(docs):
        pairs = [p for j, p in enumerate(d["sampled_pairs"]) if (i, j) in keys]
        if pairs:
            out.append(dict(d, sampled_pairs=pairs))
    return out


def make_splits(recipe: DistillRecipe) -> dict[str, dict[str, list[dict]]]:
    """split -> language -> documents (with only the sampled pairs); seeded, by document."""
    from glotkit.hipe.data import split_by_document

    distill_cfg = recipe.distill
    if not distill_cfg.data:
        raise GlotkitError("distill.data: no gold HIPE-2026 files given")
    docs = [doc for f in distill_cfg.data for doc in _read(recipe, f)]
    seen: set[str] = set()
    for doc in docs:
        if doc["document_id"] in seen:
            raise GlotkitError(f"distill.data: document id '{doc['document_id']}' appears twice")
        seen.add(doc["document_id"])
    splits: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
    limits = {"train": distill_cfg.train_pairs, "dev": distill_cfg.dev_pairs, "test": distill_cfg.test_pairs}
    for lang, ds in sorted(_by_language(docs, "distill.data").items()):
        rest, test = split_by_document(ds, distill_cfg.test_ratio, recipe.seed)
        if distill_cfg.dev_ratio > 0:
            train, dev = split_by_document(rest, min(0.9, distill_cfg.dev_ratio / (1 - distill_cfg.test_ratio)), recipe.seed + 1)
        else:
            train, dev = rest, []
        for name, part in (("train", train), ("dev", dev), ("test", test)):
            splits[name][lang] = _sample_pairs(part, limits[name], recipe.seed)
        if not splits["train"][lang] or not splits["test"][lang]:
            raise GlotkitError(f"distill.data: language '{lang}' has too few documents ({len(ds)}) for a train and "
                               "a test split")
    return splits


def _silver(recipe: DistillRecipe, gold_ids: set[str]) -> dict[str, list[dict]]:
    distill_cfg = recipe.distill
    if not distill_cfg.silver or not distill_cfg.silver_pairs:
        return {}
    docs = [doc for f in distill_cfg.silver for doc in _read(recipe, f) if doc["document_id"] not in gold_ids]
    return {lang: _sample_pairs(ds, distill_cfg.silver_pairs, recipe.seed + 2)
            for lang, ds in sorted(_by_language(docs, "distill.silver").items())}


def items_of(docs_by_lang: dict[str, list[dict]]) -> list[tuple[dict, dict]]:
    return [(doc, p) for lang in sorted(docs_by_lang) for doc in docs_by_lang[lang] for p in doc["sampled_pairs"]]


def training_items(splits) -> list[tuple[dict, dict]]:
    """The pairs the teacher learns and explains: the gold train split, then the silver pairs."""
    return items_of(splits["train"]) + items_of(splits.get("silver", {}))


def trace_items(splits, limit: int | None, seed: int) -> list[tuple[dict, dict]]:
    """The training pairs the teacher explains: all of them (``limit`` None), else per language a
    seeded sample of ``limit`` pairs drawn round-robin over the (at, isAt) combinations, so a rare
    combination gives all its pairs before a common one gives more than its share; in the order of
    :func:`training_items`."""
    items = training_items(splits)
    if limit is None:
        return items
    groups: dict[str, dict[str, list[int]]] = {}  # language -> "at/isAt" -> item indices
    for i, (doc, p) in enumerate(items):
        groups.setdefault(doc.get("language") or "", {}).setdefault(f"{p['at']}/{p['isAt']}", []).append(i)
    rng, chosen = random.Random(seed), set()
    for _, by_label in sorted(groups.items()):
        queues = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
        taken = 0
        while taken < limit and any(queues):
            for q in queues:
                if q and taken < limit:
                    chosen.add(q.pop())
                    taken += 1
    return [it for i, it in enumerate(items) if i in chosen]


def _counts(by_lang: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    return {lang: {"documents": len(ds), "pairs": sum(len(x["sampled_pairs"]) for x in ds)} for lang, ds in by_lang.items()}


def _write_splits(recipe: DistillRecipe, run_dir: Path, splits) -> dict[str, dict[str, dict[str, int]]]:
    """Write each split's documents (and the silver ones, added to ``splits``); return the counts."""
    f = _folder(run_dir)
    gold_ids = {doc["document_id"] for by_lang in splits.values() for ds in by_lang.values() for doc in ds}
    silver = _silver(recipe, gold_ids)
    if silver:
        splits["silver"] = silver
    summary = {}
    for name, by_lang in splits.items():
        atomic_write_jsonl(f.split_file(name), [doc for lang in sorted(by_lang) for doc in by_lang[lang]])
        summary[name] = _counts(by_lang)
    atomic_write_json(f.split_summary, summary)
    return summary


# --------------------------------------------------------------------------- checks


def _settings(recipe: DistillRecipe, fmt: str):
    from glotkit.hipe.predict import Settings

    distill_cfg = recipe.distill
    return Settings(fmt=fmt, max_chars=distill_cfg.max_chars, label_tokens=distill_cfg.label_tokens,
                    explain_tokens=distill_cfg.explain_tokens,
                    batch_size=distill_cfg.batch_size, labels=distill_cfg.labels,
                    layout=distill_cfg.prompt_layout)


def check_inputs(recipe: DistillRecipe, log: Callable[[str], None] = say) -> dict:
    """Fail on bad input before any model is loaded: the data (schema, empty mentions), the
    students (names, vocabularies for logit-level distillation), and warn about a student that
    is larger than its teacher.  Returns the splits (:func:`make_splits`)."""
    from glotkit.eval.memory import estimate_before_loading

    splits = make_splits(recipe)
    distill_cfg = recipe.distill
    names = [s.name for s in distill_cfg.students]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GlotkitError(f"distill.students: the name '{dup[0]}' is used twice")
    stages = set(recipe.stages)
    if not stages & {"student", "evaluate"} or not distill_cfg.students:
        return splits
    teacher = estimate_before_loading(recipe.model.name)
    t_params = teacher.linear_params + teacher.other_params
    for st in distill_cfg.students:
        if st.trim_vocab and st.model != recipe.model.name:
            log(f"note: student '{st.name}': trim_vocab trims '{st.model}', not the teacher's base")
        est = estimate_before_loading(st.model)
        params = est.linear_params + est.other_params
        if params > t_params and not st.trim_vocab:
            log(f"warning: student '{st.name}' ({params:,} parameters) is larger than the teacher "
                f"'{recipe.model.name}' ({t_params:,}); distillation usually goes to a smaller model")
        if distill_cfg.level == "logits":
            check_logit_level(recipe.model.name, st.model, st.name, trimmed=st.trim_vocab)
    return splits


def check_logit_level(teacher: str, student: str, name: str, trimmed: bool = False) -> None:
    """Logit-level distillation compares the two models' next-token distributions id by id, so it
    needs one vocabulary; refuse it otherwise (response-level distillation needs none)."""
    if trimmed:
        raise GlotkitError(f"distill.level: logits: student '{name}' has a trimmed vocabulary, so its token ids are "
                           "not the teacher's; use level: response (the student learns the teacher's text)")
    a, b = _tokenizer(teacher), _tokenizer(student)
    if a.get_vocab() != b.get_vocab():
        raise GlotkitError(
            f"distill.level: logits: teacher '{teacher}' ({len(a):,} tokens) and student '{name}' = '{student}' "
            f"({len(b):,} tokens) have different vocabularies, so their logits cannot be compared token by token; "
            "use level: response (the student learns the teacher's written explanations and labels)")
    raise GlotkitError("distill.level: logits: logit-level distillation is not implemented yet "
                       "(the vocabularies agree); use level: response")


# --------------------------------------------------------------------------- stages


def model_slug(name: str) -> str:
    """A model name (built-in, folder or hub id) as one plain folder name: never '.', '..' or a path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if "/" in name else name).strip("_.") or "model"


def _splits(run: Run) -> dict:
    """The splits (read by the check), written to ``split/`` once per run and logged."""
    if "splits" not in run.shared:
        splits = run.checked if run.checked is not None else make_splits(run.recipe)
        summary = _write_splits(run.recipe, run.folder.root, splits)
        for name in ("train", "dev", "test"):
            run.log(f"{name}: " + ", ".join(f"{k} {v['documents']} documents / {v['pairs']} pairs"
                                                       for k, v in sorted(summary[name].items())))
        run.shared["splits"] = splits
    return run.shared["splits"]


def _stage(name: str, body: Callable[[Run, dict], Any]) -> Stage:
    def run_(run: Run) -> None:
        body(run, _splits(run))

    return Stage(name, run_)


class DistillFolder(RunFolder):
    """The paths of a distillation run (see the module docstring), each named once."""

    split = property(lambda self: self.root / "split")
    split_summary = property(lambda self: self.root / "split" / "summary.json")
    compare = property(lambda self: self.root / "compare")
    compare_table = property(lambda self: self.root / "compare" / "table.md")
    teacher_adapter = property(lambda self: self.root / "teacher" / "adapter")
    teacher_train = property(lambda self: self.root / "teacher" / "train")
    teacher_curve = property(lambda self: self.root / "teacher" / "curve.jsonl")
    traces = property(lambda self: self.root / "traces")
    traces_summary = property(lambda self: self.root / "traces" / "summary.json")
    explanations = property(lambda self: self.root / "traces" / "explanations.jsonl")
    checked = property(lambda self: self.root / "traces" / "checked.jsonl")
    traces_file = property(lambda self: self.root / "traces" / "traces.jsonl")
    evaluate = property(lambda self: self.root / "evaluate")
    table_json = property(lambda self: self.root / "evaluate" / "table.json")
    table_md = property(lambda self: self.root / "evaluate" / "table.md")

    def split_file(self, name: str) -> Path:
        return self.split / f"{name}.jsonl"

    def compared(self, model: str, fmt: str) -> Path:
        """Dev-split predictions of one compared model in one prompt format."""
        return self.compare / f"{model_slug(model)}--{fmt}"

    def compared_results(self, model: str) -> list[tuple[str, Path]]:
        """(format, result.json) of each format ``model`` was compared in."""
        return [(f.parent.name.split("--", 1)[1], f)
                for f in sorted(self.compare.glob(f"{model_slug(model)}--*/result.json"))]

    def train_result(self, train_dir: Path) -> Path:
        return train_dir / "result.json"

    def student(self, name: str) -> Path:
        return self.root / "students" / name

    def student_adapter(self, name: str) -> Path:
        return self.student(name) / "adapter"

    def student_train(self, name: str) -> Path:
        return self.student(name) / "train"

    def student_model(self, name: str) -> Path:
        """A student's trimmed-vocabulary copy of its base model."""
        return self.student(name) / "model"

    def evaluation(self, label: str) -> Path:
        return self.evaluate / model_slug(label)

    def calibration(self, label: str) -> Path:
        """The offsets fit on the dev split for one evaluated model (``calibrate``)."""
        return self.evaluation(label) / "calibration.json"


def _folder(run_dir: Path | DistillFolder) -> DistillFolder:
    return run_dir if isinstance(run_dir, DistillFolder) else DistillFolder(run_dir)


class DistillSystem:
    """HIPE-2026 distillation as a system (see :class:`glotkit.systems.base.System`)."""

    name = "distill"
    title = "distillation (HIPE-2026)"
    schema = DistillRecipe
    folder_type = DistillFolder
    verbs = (Verb("train", "only the training stage of a recipe (distillation: the teacher)", stages=("teacher",)),
             Verb("distill", "HIPE-2026 distillation stages: 'compare' prompt formats × models on the dev split, "
                             "'teach' (teacher adapter + explanation traces), 'student' (students + the "
                             "efficiency–accuracy table + report)",
                  choices={"compare": ("compare",), "teach": ("teacher", "traces"),
                           "student": ("student", "evaluate", "report")},
                  tools={"score": Tool("the official HIPE-2026 figures of a predictions file against its gold file "
                                       "(at and isAt macro recall, the file score, the binary view; bootstrap "
                                       "intervals over documents)",
                                       lambda p: score_arguments(p), lambda args: score_command(args)),
                         "predict": Tool("label any HIPE-2026 file (e.g. a campaign's masked test file) with a "
                                         "run's teacher or student and write a predictions file the campaign "
                                         "accepts; resumable",
                                         lambda p: predict_arguments(p), lambda args: predict_command(args))}))
    result_neutral = ()
    # stages that record their own settings and are redone when these change
    redone_by_settings = ("distill.compare_", "distill.untuned", "distill.within_points")
    multi_process = False

    def stages(self, recipe: DistillRecipe) -> list[Stage]:
        def students(run: Run, splits: dict) -> None:
            for st in run.recipe.distill.students:
                train_student(run.recipe, run.folder.root, st, splits, run.log, run.progress,
                              on_log=_tracked(run, f"student.{st.name}"))

        return [
            _stage("compare", lambda run, splits: run_compare(run.recipe, run.folder.root, run.log, run.progress)),
            _stage("teacher", lambda run, splits: train_teacher(run.recipe, run.folder.root, splits, run.log,
                                                                run.progress, on_log=_tracked(run))),
            _stage("traces", lambda run, splits: write_traces(run.recipe, run.folder.root, splits, run.log,
                                                              run.progress)),
            _stage("student", students),
            _stage("evaluate", lambda run, splits: run_evaluate(run.recipe, run.folder.root, run.log, run.progress)),
            _stage("report", lambda run, splits: run.log(f"report: {write_report(run.folder, run.recipe)}")),
        ]

    def check(self, recipe: DistillRecipe, folder: DistillFolder, log) -> dict:
        if recipe.finetune != "lora":
            raise GlotkitError("finetune: full is not supported by system 'distill' (the teacher and students are "
                               "LoRA adapters); use finetune: lora")
        return check_inputs(recipe, log=log)

    def describe(self, run: Run) -> str:
        return f"distillation (HIPE-2026), stages {', '.join(run.recipe.stages)}"

    def summary(self, folder: DistillFolder) -> dict[str, Any]:
        """Score (×100) and parameters of each evaluated model, and whether every student stays
        within ``within_points`` of the teacher in every language."""
        table = folder.read_json(folder.table_json)
        if not table:
            return {}
        out: dict[str, Any] = {}
        for r in table["rows"]:
            out[f"{r['label']} score"] = round(r["score"] * 100, 2)
            out |= {f"{r['label']} {x}": round(v * 100, 2) for x, v in r["languages"].items()}
        return out


SYSTEM = DistillSystem()


def run_compare(recipe: DistillRecipe, run_dir: Path, log, progress) -> list[dict]:
    """Every compared model × prompt format on the dev split, then ``compare/table.md``."""
    from glotkit.hipe.predict import evaluate_model

    distill_cfg, f = recipe.distill, _folder(run_dir)
    dev = f.split_file("dev")
    if not distill_cfg.dev_ratio or not dev.is_file() or not dev.read_text(encoding="utf-8").strip():
        raise GlotkitError("distill.dev_ratio: the prompt comparison needs a dev split (dev_ratio > 0)")
    rows = []
    for model in distill_cfg.compare_models:
        server = _connector(recipe, recipe.compare_role(model), log, "compare")
        for fmt in distill_cfg.compare_formats:
            r = evaluate_model(f"{model} / {fmt}", {"name": model}, None, dev, _settings(recipe, fmt),
                               f.compared(model, fmt), progress=progress, log=log,
                               server=server)
            rows.append(r | {"format": fmt})
    atomic_write_text(f.compare_table, compare_table(rows))
    return rows


def with_ci(value: float | None, ci: Sequence[float] | None = None) -> str:
    """A score ×100 with two decimals, and its interval when there is one: ``45.56 [39.1, 52.0]``."""
    if value is None:
        return "–"
    return f"{value * 100:.2f}" + (f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]" if ci else "")


def _ci(r: dict, *path: str):
    """The interval at ``path`` of a result's ``ci`` (None in results made before intervals)."""
    node = r.get("ci")
    for k in path:
        node = node.get(k) if isinstance(node, dict) else None
    return node


def compare_table(rows: Sequence[dict]) -> str:
    langs = sorted({lang for r in rows for lang in r["languages"]})
    head = ["model", "format", "score", "binary", *langs, "parse failures", "s / pair"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        t, p = r["timing"], r["profile"]
        out.append(f"| {r['model']} | {r['format']} | {with_ci(p['score'], _ci(p, 'score'))} | "
                   f"{with_ci(p['binary_score'], _ci(p, 'binary_score'))} | "
                   + " | ".join(with_ci(r["languages"][x]["score"], _ci(r["languages"][x], "score"))
                                if x in r["languages"] else "–" for x in langs)
                   + f" | {r['parse_failure_rate'] * 100:.1f} % | {t['seconds'] / max(1, t['pairs']):.2f} |")
    return "\n".join(out) + "\n"


def best_format(run_dir: Path, model: str, default: str) -> str:
    """The format that scored best for ``model`` in the comparison (ties: fewer parse failures,
    then faster); ``default`` when the model was not compared."""
    found = []
    for fmt, path in _folder(run_dir).compared_results(model):
        r = json.loads(path.read_text(encoding="utf-8"))
        found.append((-r["profile"]["score"], r["parse_failure_rate"], r["timing"]["seconds"], fmt))
    return min(found)[3] if found else default


def _tracked(run: Run, name: str | None = None):
    """The experiment trackers' step logger of the run (None: none asked for); ``name``: one of
    several trainings of a stage, tracked under its own name."""
    tracker = run.shared.get("tracker")
    if tracker is None:
        return None
    return tracker.step if name is None else tracker.step_of(name)


def _train_adapter(recipe: DistillRecipe, model_cfg, examples, out: Path, work: Path, what: str, log, progress,
                   epochs: float | None = None, lr: float | None = None, on_epoch=None, on_log=None) -> None:
    """Train one adapter; ``on_epoch(model, tokenizer, device)``, when given, makes the engine's
    end-of-epoch hook."""
    import torch

    from glotkit.models.loading import load_model
    from glotkit.models.lora import apply_lora
    from glotkit.train.engine import train_adapter

    cfg = recipe.train.model_copy(update={k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None})
    torch.manual_seed(recipe.seed)
    model, tok, device = load_model(model_cfg, log=log)
    fitting = [e for e in examples if len(e.input_ids) <= cfg.max_length]
    if len(fitting) < len(examples):
        log(f"warning: {what}: {len(examples) - len(fitting)} of {len(examples)} examples longer than "
            f"train.max_length={cfg.max_length} were dropped")
    if not fitting:
        raise GlotkitError(f"{what}: no example fits train.max_length={cfg.max_length}")
    model = apply_lora(model, recipe.lora)
    train_adapter(model, fitting, cfg, what=what, out=out, work_dir=work, seed=recipe.seed,
                  pad_id=tok.pad_token_id, device=device, log=log, progress=progress,
                  info={"dropped_too_long": len(examples) - len(fitting), "epochs": cfg.epochs, "lr": cfg.lr},
                  on_epoch=on_epoch(model, tok, device) if on_epoch else None, on_log=on_log)


def _tokenizer(name: str):
    from glotkit.config import ModelSection
    from glotkit.models.loading import tokenizer_for

    return tokenizer_for(ModelSection(name=name), log=lambda m: None)


def train_teacher(recipe: DistillRecipe, run_dir: Path, splits, log, progress, on_log=None) -> None:
    """LoRA (QLoRA with model.quantization: nf4) on the gold train labels in ``teacher_format``."""
    from glotkit.hipe.formats import PromptBuilder, question, response

    f = _folder(run_dir)
    out = f.teacher_adapter
    if (out / "adapter_config.json").is_file():
        log("teacher: trained before, kept")
        return
    distill_cfg = recipe.distill
    builder = PromptBuilder(_tokenizer(recipe.model.name))
    fmt = distill_cfg.teacher_format
    items = training_items(splits)
    repeats = label_repeats(items) if distill_cfg.balance == "oversample" else {}
    counts = label_counts(items)
    silver = len(items_of(splits.get("silver", {})))
    log(f"teacher: {len(items)} training pairs ({len(items) - silver} gold, {silver} silver), labels "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        + (" ; oversampled " + ", ".join(f"{k} ×{v}" for k, v in repeats.items()) if repeats else ""))
    examples = [builder.example(question(doc, p, fmt, distill_cfg.max_chars, distill_cfg.prompt_layout), fmt,
                                response(fmt, p["at"], p["isAt"]), group=doc["document_id"])
                for doc, p in items for _ in range(repeats.get(f"{p['at']}/{p['isAt']}", 1))]
    from glotkit.train.engine import CHECKPOINT, previous_checkpoint

    ckpt = f.teacher_train / CHECKPOINT
    if not (ckpt.is_file() or previous_checkpoint(ckpt).is_file()):
        f.teacher_curve.unlink(missing_ok=True)  # a fresh start: an earlier curve is not this run's
    curve = (lambda model, tok, device: _dev_curve(recipe, f, model, tok, device, log, progress)) \
        if distill_cfg.dev_curve else None
    _train_adapter(recipe, recipe.model, examples, out, f.teacher_train, "teacher", log, progress, on_epoch=curve,
                   on_log=on_log)


def _dev_curve(recipe: DistillRecipe, f: DistillFolder, model, tok, device, log, progress):
    """The end-of-epoch hook that labels the dev split with the model being trained and appends
    its scores to ``teacher/curve.jsonl`` (an epoch already there is skipped: a resumed run)."""
    from glotkit.generate.local import LocalGenerator
    from glotkit.hipe.predict import predict_pairs, score_rows
    from glotkit.io import append_rows, read_appended

    by_lang = _split_gold(f, "dev", "distill.dev_curve: the teacher's dev curve")
    items = [(d, p) for ds in by_lang.values() for d in ds for p in d["sampled_pairs"]]
    settings = _settings(recipe, recipe.distill.teacher_format)

    def hook(epoch: int, step: int) -> None:
        if epoch in read_appended(f.teacher_curve, lambda r: r["epoch"]):
            return
        rows, timing = predict_pairs(LocalGenerator(model, tok, device), items, settings, progress=progress,
                                     desc=f"teacher epoch {epoch}: dev")
        r = score_rows(by_lang, rows)
        row = {"epoch": epoch, "step": step} | _scores_brief(r) | {
               "binary_score": r["profile"]["binary_score"],
               "chosen": label_counts([(None, x) for x in rows]), "pairs": len(rows), "seconds": timing["seconds"]}
        with open(f.teacher_curve, "a", encoding="utf-8") as fh:
            append_rows(fh, [row])
        log(f"teacher after epoch {epoch} (step {step}): dev score {with_ci(row['score'], row['ci'])}; "
            + ", ".join(f"{x} {with_ci(v['score'], v['ci'])}" for x, v in row["languages"].items())
            + "; chose " + ", ".join(f"{k} {v}" for k, v in sorted(row["chosen"].items(), key=lambda kv: -kv[1])))

    return hook


def _split_gold(f: DistillFolder, split: str, what: str) -> dict[str, list[dict]]:
    """A split's gold documents by language; ``what`` needs it, and says so when it is empty."""
    from glotkit.hipe.data import read_hipe

    path = f.split_file(split)
    docs = read_hipe(path, schema=None) if path.is_file() and path.stat().st_size else []
    if not docs:
        raise GlotkitError(f"{what} needs a {split} split" + (" (dev_ratio > 0)" if split == "dev" else ""))
    return _by_language(docs, str(path))


def _scores_brief(r: dict) -> dict:
    """The profile and per-language scores of a :func:`glotkit.hipe.predict.score_rows` result,
    each with its interval."""
    p = r["profile"]
    return {"score": p["score"], "ci": _ci(p, "score"),
            "languages": {x: {"score": v["score"], "ci": _ci(v, "score")} for x, v in r["languages"].items()}}


def label_counts(items: Sequence[tuple[dict, dict]]) -> dict[str, int]:
    """How many pairs carry each "at/isAt" combination."""
    from collections import Counter

    return dict(Counter(f"{p['at']}/{p['isAt']}" for _, p in items))


def label_repeats(items: Sequence[tuple[dict, dict]]) -> dict[str, int]:
    """How often each (at, isAt) combination's pairs are repeated to soften the imbalance:
    round(sqrt(largest count / its count)), at least once (square-root balancing: the rare labels
    are seen more often without learning a handful of pairs by heart)."""
    import math

    counts = label_counts(items)
    top = max(counts.values(), default=0)
    return {k: max(1, round(math.sqrt(top / n))) for k, n in sorted(counts.items())}


def _key(doc: dict, pair: dict) -> str:
    return "\t".join((doc["document_id"], pair["pers_entity_id"], pair["loc_entity_id"]))


def write_traces(recipe: DistillRecipe, run_dir: Path, splits, log, progress, model=None, tok=None, device="cpu") -> dict:
    """The teacher explains every training pair's gold label (rationalization: the label is in the
    answer, and the explanation starts with the person's name; ``distill.explain_with: base``
    writes the explanations with the adapter switched off), then the tuned teacher answers again
    after the explanation with the label left out of the prompt; a trace is kept when that answer
    equals gold.  Both steps append to JSONL files batch by batch, so an interrupted run
    continues where it stopped."""
    from glotkit.hipe.formats import PromptBuilder, decoding, explanation_of, parse, question, rationalization
    from glotkit.io import read_appended

    f = _folder(run_dir)
    if f.traces_summary.is_file():
        log("traces: written before, kept")
        return json.loads(f.traces_summary.read_text(encoding="utf-8"))
    distill_cfg = recipe.distill
    fmt = distill_cfg.student_format
    items = trace_items(splits, distill_cfg.trace_pairs, recipe.seed + 3)
    silver_ids = {doc["document_id"] for ds in splits.get("silver", {}).values() for doc in ds}
    from glotkit.generate import for_role, served
    from glotkit.generate.local import LocalGenerator

    roles = ("teacher", distill_cfg.explain_with)
    if all(served(recipe.generate, r) for r in roles):  # servers generate: the tokenizer is enough
        from glotkit.models.loading import tokenizer_for

        tok = tokenizer_for(recipe.model, log=log)
    elif model is None:
        from peft import PeftModel

        from glotkit.models.loading import load_model

        adapter = f.teacher_adapter
        if not (adapter / "adapter_config.json").is_file():
            raise GlotkitError(f"{adapter}: no teacher adapter; add 'teacher' to stages")
        model, tok, device = load_model(recipe.model, log=log)
        model = PeftModel.from_pretrained(model, str(adapter))
    # who explains (the base model: the teacher with its adapter switched off, or the teacher)
    # and who checks (the tuned teacher)
    generators = {role: for_role(recipe.generate, role, lambda role=role: LocalGenerator(
        model, tok, device, adapter_off=role == "base"), tokenizer=tok, log=log, what="traces")
        for role in sorted(set(roles))}
    explainer, checker = generators[distill_cfg.explain_with], generators["teacher"]
    f.traces.mkdir(parents=True, exist_ok=True)
    builder = PromptBuilder(tok)
    gen = dict(batch_size=distill_cfg.batch_size, progress=progress)

    # 1. explanations of the gold labels
    path = f.explanations
    done = read_appended(path, lambda r: r["key"])
    todo = [(doc, p) for doc, p in items if _key(doc, p) not in done]
    if done and todo:
        log(f"traces: {len(done)} explanations already written, continuing")
    asks = [rationalization(doc, p, fmt, distill_cfg.max_chars, distill_cfg.prompt_layout) for doc, p in todo]
    s1, n1 = _generate_appending(
        explainer, path, [builder.prompt_ids(user, fmt, turn=turn) for user, turn, _ in asks],
        lambda i, t: {"key": _key(*todo[i]), "raw": t,
                      "explanation": explanation_of(asks[i][2] + t) if _usable(t) else ""},
        max_new_tokens=distill_cfg.explain_tokens, stop=("\n", "Answer:"), desc="teacher explains", **gen)
    explained = read_appended(path, lambda r: r["key"])

    # 2. the teacher's own answer after its explanation, without the gold label
    path2 = f.checked
    done2 = read_appended(path2, lambda r: r["key"])
    usable = [(doc, p) for doc, p in items if _usable(explained[_key(doc, p)]["explanation"])]
    todo2 = [(doc, p) for doc, p in usable if _key(doc, p) not in done2]

    def checked_row(i: int, text: str) -> dict:
        r = parse(fmt, "Answer:" + text)
        return {"key": _key(*todo2[i]), "raw": text, "at": r.at, "isAt": r.isAt, "parsed": r.ok}

    layout = distill_cfg.prompt_layout
    check_prompts = [builder.prompt_ids(question(doc, p, fmt, distill_cfg.max_chars, layout), fmt,
                                        after_cue=" " + explained[_key(doc, p)]["explanation"] + "\nAnswer:")
                     for doc, p in todo2]
    if distill_cfg.labels == "loglik":  # the checker's labels are chosen among the valid ones, as in evaluation
        s2, n2 = _choose_appending(checker, path2, check_prompts, fmt, lambda i: _key(*todo2[i]),
                                   batch_size=distill_cfg.batch_size, progress=progress, desc="teacher checks")
    else:
        s2, n2 = _generate_appending(
            checker, path2, check_prompts, checked_row, max_new_tokens=distill_cfg.label_tokens,
            stop=decoding(fmt, distill_cfg.label_tokens, distill_cfg.explain_tokens).stop,
            keep_stop=True, desc="teacher checks", **gen)
    seconds, produced = s1 + s2, n1 + n2
    checked = read_appended(path2, lambda r: r["key"])

    from glotkit.hipe.rationale import check as rationale_check

    traces, counts = [], {}
    rationales = {"checked": 0, "person": 0, "place": 0, "grounded": 0}
    for doc, p in items:
        k = _key(doc, p)
        e, c = explained[k], checked.get(k)
        r = rationale_check(e["explanation"], doc, p) if _usable(e["explanation"]) else None
        if r is not None:
            rationales["checked"] += 1
            for part, ok in r.items():
                rationales[part] += ok
        reason = ("no usable explanation" if r is None else
                  "answer not parsed" if not c["parsed"] else
                  "answer differs from gold" if (c["at"], c["isAt"]) != (p["at"], p["isAt"]) else
                  "explanation does not name the person and the place"
                  if distill_cfg.trace_check and not (r["person"] and r["place"]) else
                  "explanation neither quotes nor paraphrases the article"
                  if distill_cfg.trace_check and not r["grounded"] else None)
        lang = doc.get("language")
        kind = "silver" if doc["document_id"] in silver_ids else "gold"
        cell = counts.setdefault(f"{kind}:{lang}", {"written": 0, "kept": 0, "by_label": {}, "dropped": {}})
        lab = cell["by_label"].setdefault(f"{p['at']}/{p['isAt']}", {"written": 0, "kept": 0})
        cell["written"] += 1
        lab["written"] += 1
        if reason:
            cell["dropped"][reason] = cell["dropped"].get(reason, 0) + 1
            continue
        cell["kept"] += 1
        lab["kept"] += 1
        traces.append({"key": k, "language": lang, "source": kind, "at": p["at"], "isAt": p["isAt"],
                       "explanation": e["explanation"]})
    atomic_write_jsonl(f.traces_file, traces)
    informative = sum((t["at"], t["isAt"]) != ("FALSE", "FALSE") for t in traces)
    summary = {"written": len(items), "kept": len(traces), "kept_not_false_false": informative,
               "rationales": rationales, "counts": counts, "seconds": round(seconds, 1),
               "new_tokens": produced, "tokens_per_s": round(produced / seconds, 1) if seconds else None,
               "format": fmt}
    atomic_write_json(f.traces_summary, summary)
    log(f"traces: kept {len(traces)} of {len(items)} ("
        + ", ".join(f"{k} {v['kept']}/{v['written']}" for k, v in sorted(counts.items())) + f"); "
        f"{informative} of the kept are not FALSE/FALSE; of {rationales['checked']} explanations "
        f"{rationales['person']} name the person, {rationales['place']} the place, {rationales['grounded']} "
        "quote or paraphrase the article")
    return summary


def _server(recipe: DistillRecipe, role: str, log, what: str, optional: bool = False):
    """The served generator of ``role`` (checked to be served) where it answers from a server,
    else None (an ``optional`` role without a served name answers locally)."""
    connect = _connector(recipe, role, log, what, optional)
    return connect() if connect else None


def _connector(recipe: DistillRecipe, role: str, log, what: str, optional: bool = False):
    """A function that connects (once) to the server of ``role``, for stages that connect only
    when something is left to ask; None where ``role`` answers locally (in a process of its own,
    where its memory is measured)."""
    from glotkit.generate import for_role, served

    if not served(recipe.generate, role, optional):
        if served(recipe.generate, role):  # a server runs, but this optional role is not on it
            log(f"{what}: no generate.models.{role}: that model answers locally")
        return None
    from functools import cache

    return cache(lambda: for_role(recipe.generate, role, None, tokenizer=None, log=log, what=what))


def _generate_appending(generator, path: Path, prompts, row: Callable[[int, str], dict],
                        **gen) -> tuple[float, int]:
    """Greedy generation for ``prompts`` (our own loop: finished rows leave the batch), each
    batch's ``row(index, text)`` appended (fsynced) to ``path`` as it ends; returns (seconds,
    new tokens)."""
    import time

    from glotkit.io import append_rows

    if not prompts:
        return 0.0, 0
    with path.open("a", encoding="utf-8") as fh:
        t0 = time.perf_counter()

        def write(idx: list[int], texts: list[str]) -> None:
            append_rows(fh, [row(i, t) for i, t in zip(idx, texts)])

        n = generator.sample(prompts, temperature=0.0, on_batch=write, **gen).new_tokens
    return time.perf_counter() - t0, n


def _choose_appending(generator, path: Path, prompts, fmt: str, key: Callable[[int], Any], *, batch_size: int,
                      progress: bool, desc: str) -> tuple[float, int]:
    """The likeliest valid labels after each prompt (log-likelihood of the five combinations),
    appended (fsynced) to ``path`` chunk by chunk; returns (seconds, 0 new tokens)."""
    import time

    from tqdm.auto import tqdm

    from glotkit.hipe.formats import label_options
    from glotkit.hipe.predict import LABEL_CHUNK, chosen_labels
    from glotkit.io import append_rows

    if not prompts:
        return 0.0, 0
    t0 = time.perf_counter()
    chunk = LABEL_CHUNK  # fixed: the scores do not depend on the batch size
    with path.open("a", encoding="utf-8") as fh, tqdm(total=len(prompts), desc=desc, unit="pair",
                                                      disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), chunk):
            part = range(start, min(len(prompts), start + chunk))
            scores = generator.option_logliks([prompts[i] for i in part], label_options(fmt), batch_size=batch_size,
                                              progress=False, desc=desc)
            append_rows(fh, [{"key": key(i), "raw": None, "parsed": True} | chosen_labels(sc)
                             for i, sc in zip(part, scores)])
            bar.update(len(part))
    return time.perf_counter() - t0, 0


def _usable(text: str) -> bool:
    """An explanation worth learning from: a few words of the model's own, not a label dump."""
    return len(text.split()) >= 3 and "{" not in text


def train_student(recipe: DistillRecipe, run_dir: Path, st, splits, log, progress, on_log=None) -> None:
    """SFT of one student on the kept traces (response-level: the teacher's text, any vocabulary)."""
    from glotkit.hipe.formats import PromptBuilder, question, response

    f = _folder(run_dir)
    out = f.student_adapter(st.name)
    if (out / "adapter_config.json").is_file():
        log(f"student '{st.name}': trained before, kept")
        return
    distill_cfg = recipe.distill
    traces_path = f.traces_file
    if not traces_path.is_file():
        raise GlotkitError(f"{traces_path}: no traces; add 'traces' to stages")
    from glotkit.io import read_jsonl

    traces = read_jsonl(traces_path)
    if not traces:
        raise GlotkitError(f"{traces_path}: the teacher kept no trace, so there is nothing to distill")
    if distill_cfg.level == "logits":
        check_logit_level(recipe.model.name, st.model, st.name, trimmed=st.trim_vocab)
    by_key = {_key(doc, p): (doc, p) for doc, p in training_items(splits)}
    model_name = student_model_path(recipe, run_dir, st, splits, traces, log)
    builder = PromptBuilder(_tokenizer(model_name))
    examples = []
    for t in traces:
        doc, p = by_key[t["key"]]
        examples.append(builder.example(question(doc, p, distill_cfg.student_format, distill_cfg.max_chars,
                                                 distill_cfg.prompt_layout),
                                        distill_cfg.student_format,
                                        response(distill_cfg.student_format, t["at"], t["isAt"], t["explanation"]),
                                        group=doc["document_id"]))
    cfg = recipe.model.model_copy(update={"name": model_name, "quantization": "none"})
    _train_adapter(recipe, cfg, examples, out, f.student_train(st.name), f"student '{st.name}'", log, progress,
                   epochs=distill_cfg.student_epochs, lr=distill_cfg.student_lr,
                   on_log=on_log)


def student_model_path(recipe: DistillRecipe, run_dir: Path, st, splits, traces, log) -> str:
    """The student's base: its model, or with ``trim_vocab`` a copy keeping only the tokens of
    the training articles, the prompts and the traces (plus every BPE merge path and byte
    fallback, so any text still encodes)."""
    if not st.trim_vocab:
        return st.model
    folder = _folder(run_dir).student_model(st.name)
    if (folder / "glotkit-trim.json").is_file():
        return str(folder)
    from glotkit.hipe.formats import FORMATS, question
    from glotkit.models.loading import resolve_model_path
    from glotkit.models.trim_vocab import trim_vocabulary

    items = training_items(splits)
    texts = list({doc["document_id"]: doc["text"] for doc, _ in items}.values())
    texts += [question(items[0][0], items[0][1], fmt, recipe.distill.max_chars, recipe.distill.prompt_layout)
              for fmt in FORMATS]
    texts += [t["explanation"] for t in traces]
    texts += ['{"at": "TRUE", "isAt": "FALSE"} {"at": "PROBABLE", "isAt": "TRUE"} at: FALSE isAt: TRUE Answer:']
    info = trim_vocabulary(resolve_model_path(st.model, log=log), texts, folder, log=log)
    log(f"student '{st.name}': vocabulary {info['vocab_before']:,} -> {info['vocab_after']:,}")
    return str(folder)


def _entries(recipe: DistillRecipe, run_dir: Path) -> list[dict]:
    distill_cfg, f = recipe.distill, _folder(run_dir)
    teacher = recipe.model.model_dump(mode="json")
    out = []
    if distill_cfg.untuned:
        out.append({"label": "teacher (untuned)", "role": "untuned teacher", "model": teacher, "adapter": None,
                    "format": best_format(run_dir, recipe.model.name, distill_cfg.teacher_format), "served_as": "base"})
    out.append({"label": "teacher", "role": "teacher", "model": teacher,
                "adapter": str(f.teacher_adapter), "format": distill_cfg.teacher_format, "served_as": "teacher"})
    for st in distill_cfg.students:
        base = str(f.student_model(st.name)) if st.trim_vocab else st.model
        if distill_cfg.untuned:  # a trimmed base answers as its full base does: its row shows what trimming saves
            out.append({"label": f"{st.name} (untuned)", "role": "untuned student", "model": {"name": base},
                        "adapter": None, "format": best_format(run_dir, st.model, distill_cfg.student_format),
                        "served_as": f"student.{st.name}.base"})
        out.append({"label": st.name, "role": "student", "model": {"name": base},
                    "adapter": str(f.student_adapter(st.name)), "format": distill_cfg.student_format,
                    "served_as": f"student.{st.name}"})
    return out


def run_evaluate(recipe: DistillRecipe, run_dir: Path, log, progress) -> dict:
    """Every model on the test split, each in its own process (or, with ``generate.backend:
    openai``, on the server of its role where the role has a served name); then the
    efficiency–accuracy table."""
    from glotkit.hipe.predict import evaluate_model

    f = _folder(run_dir)
    entries = _entries(recipe, run_dir)
    for e in entries:  # everything the table needs exists before the first model is loaded
        if e["adapter"] and not (Path(e["adapter"]) / "adapter_config.json").is_file():
            raise GlotkitError(f"{e['adapter']}: no adapter for '{e['label']}'; add 'teacher' / 'student' to stages")
        name = e["model"]["name"]
        if Path(name).is_relative_to(f.root) and not Path(name).is_dir():
            raise GlotkitError(f"{name}: no trimmed model for '{e['label']}'; add 'student' to stages")
    results = []
    for e in entries:
        settings = _settings(recipe, e["format"])
        server = _connector(recipe, e["served_as"], log, "evaluate", optional=True)
        calibration = _calibrate(f, e, settings, server, log, progress) if recipe.distill.calibrate else None
        if calibration:
            settings.offsets = calibration["offsets"]
        r = evaluate_model(e["label"], e["model"], e["adapter"], f.split_file("test"), settings,
                           f.evaluation(e["label"]), progress=progress, log=log, server=server)
        if calibration:
            r["calibration"] = calibration | {"test_uncalibrated": _uncalibrated(f, e["label"])}
        results.append(r | {"label": e["label"], "role": e["role"], "format": e["format"]})
    table = efficiency_table(results, recipe.distill.within_points)
    table["references"] = reference_scores(recipe, f)
    table["answer"] += beats_references(table["rows"], table["references"])
    atomic_write_json(f.table_json, table)
    atomic_write_text(f.table_md, table["markdown"])
    for line in table["answer"]:
        log(f"{line}")
    return table


def beats_references(rows: Sequence[dict], refs: dict[str, dict]) -> list[str]:
    """Per tuned model: the languages where it does not beat FALSE/FALSE everywhere, and its
    overall score against the mention-position regression."""
    from glotkit.hipe.baseline import ALL_FALSE, SURFACE

    floor, surface = refs[ALL_FALSE], refs[SURFACE]
    out = []
    for r in rows:
        if r["role"] not in ("teacher", "student"):
            continue
        low = [x for x, v in r["languages"].items() if v <= floor["languages"][x]["score"]]
        out.append(f"{r['role']} '{r['label']}': "
                   + ("above FALSE/FALSE everywhere in every language" if not low else
                      "NOT above FALSE/FALSE everywhere in " + ", ".join(low))
                   + f"; overall {r['score'] * 100:.2f} vs {surface['score'] * 100:.2f} for the mention-position "
                   "regression")
    return out


def reference_scores(recipe: DistillRecipe, f: DistillFolder) -> dict[str, dict]:
    """What a model must beat on the test split to be said to read the article: FALSE/FALSE
    everywhere, and a logistic regression on where the pair is mentioned, fit on the teacher's
    training pairs (:mod:`glotkit.hipe.baseline`); each with its interval, like the models."""
    from glotkit.hipe.baseline import ALL_FALSE, SURFACE, SurfaceBaseline, all_false_rows
    from glotkit.hipe.predict import score_rows

    test = _split_gold(f, "test", "the reference scores")
    items = items_of(test)
    train = items_of(_split_gold(f, "train", "the surface baseline"))
    silver = f.split_file("silver")
    if silver.is_file() and silver.stat().st_size:
        train += items_of(_split_gold(f, "silver", "the surface baseline"))
    out = {}
    for name, rows in ((ALL_FALSE, all_false_rows(items)), (SURFACE, SurfaceBaseline(recipe.seed).fit(train).rows(items))):
        r = score_rows(test, rows)
        out[name] = _scores_brief(r) | {"binary": r["profile"]["binary_score"],
                                        "binary_ci": _ci(r["profile"], "binary_score")}
    return out


def _calibrate(f: DistillFolder, e: dict, settings, server, log, progress) -> dict | None:
    """The offsets of one model's label decision, fit on its dev-split answers (labelled first,
    in ``evaluate/<model>/dev/``) and kept in ``calibration.json``; None when its labels are
    generated, not chosen."""
    from glotkit.hipe.predict import evaluate_model, fit_offsets

    if settings.labels != "loglik":
        return None
    path = f.calibration(e["label"])
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    gold = _split_gold(f, "dev", "distill.calibrate: calibrating the label decision")
    out = f.evaluation(e["label"]) / "dev"
    evaluate_model(f"{e['label']} (dev, to calibrate)", e["model"], e["adapter"], f.split_file("dev"), settings, out,
                   progress=progress, log=log, server=server)
    rows = _read_jsonl(out / "answers.jsonl")
    offsets, before, after = fit_offsets(rows, gold)
    found = {"offsets": offsets, "dev_score": before, "dev_score_calibrated": after, "dev_pairs": len(rows)}
    atomic_write_json(path, found)
    log(f"{e['label']}: decision calibrated on {len(rows)} dev pairs: dev score {before:.4f} -> {after:.4f}; "
        "offsets " + ", ".join(f"{k} {v:+g}" for k, v in offsets.items()))
    return found


def _uncalibrated(f: DistillFolder, label: str) -> dict:
    """The test score of a calibrated model's answers without the offsets (answers keep the raw
    option scores), with its interval."""
    from glotkit.hipe.predict import score_rows, with_offsets

    return _scores_brief(score_rows(_split_gold(f, "test", "the uncalibrated test score"),
                                    with_offsets(_read_jsonl(f.evaluation(label) / "answers.jsonl"), {})))


def _ranks(values: Sequence[float], higher_better: bool) -> list[int]:
    """Competition ranks (1 = best; ties share the better rank)."""
    key = [(-v if higher_better else v) for v in values]
    return [1 + sum(k < x for k in key) for x in key]


def efficiency_table(results: Sequence[dict], within: float) -> dict:
    """Rows of the efficiency–accuracy table, HIPE-2026-style ranks (accuracy, parameters and
    size on disk, and the mean of the three), and the seed's question answered per student."""
    langs = sorted({lang for r in results for lang in r["languages"]})
    acc = _ranks([r["profile"]["score"] for r in results], True)
    par = _ranks([r["size"]["params"] for r in results], False)
    size = _ranks([r["size"]["disk_mb"] for r in results], False)
    mean = [(a + b + c) / 3 for a, b, c in zip(acc, par, size)]
    overall = _ranks(mean, False)
    rows = []
    for i, r in enumerate(results):
        rows.append({"label": r["label"], "role": r["role"], "format": r["format"], "params": r["size"]["params"],
                     "disk_mb": r["size"]["disk_mb"], "peak_rss_mb": r["memory"]["peak_rss_mb"],
                     "pairs_per_s": r["timing"]["pairs_per_s"], "backend": r.get("backend", "local"),
                     "languages": {x: r["languages"][x]["score"] for x in langs if x in r["languages"]},
                     "score": r["profile"]["score"], "binary": r["profile"]["binary_score"],
                     "ci": {"score": _ci(r["profile"], "score"), "binary": _ci(r["profile"], "binary_score"),
                            "languages": {x: _ci(r["languages"][x], "score") for x in langs if x in r["languages"]}},
                     "parse_failure_rate": r["parse_failure_rate"],
                     "calibration": r.get("calibration"),
                     "rank": {"accuracy": acc[i], "params": par[i], "size": size[i], "mean": round(mean[i], 2),
                              "overall": overall[i]}})
    head = ["model", "format", "params", "disk MB", "peak RSS MB", "pairs/s", *langs, "overall", "binary",
            "parse fail", "rank acc", "rank params", "rank size", "rank"]
    md = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "served"
        md.append(f"| {r['label']} | {r['format']} | {r['params'] / 1e6:.1f}M | {r['disk_mb']:.0f} | "
                  f"{rss} | {r['pairs_per_s']} | "
                  + " | ".join(with_ci(r["languages"][x], r["ci"]["languages"].get(x)) if x in r["languages"] else "–"
                               for x in langs)
                  + f" | **{with_ci(r['score'], r['ci']['score'])}** | {with_ci(r['binary'], r['ci']['binary'])} | "
                  f"{r['parse_failure_rate'] * 100:.1f} % | "
                  f"{r['rank']['accuracy']} | {r['rank']['params']} | {r['rank']['size']} | {r['rank']['overall']} |")
    answer = []
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    for r in rows:
        if r["role"] != "student" or teacher is None:
            continue
        gaps = {x: (r["languages"].get(x, 0.0) - teacher["languages"].get(x, 0.0)) * 100 for x in langs}
        worst = min(gaps.values()) if gaps else 0.0
        ok = all(g >= -within for g in gaps.values())
        answer.append(f"student '{r['label']}' vs teacher, points per language: "
                      + ", ".join(f"{x} {g:+.2f}" for x, g in gaps.items())
                      + (f" -> within {within:g} points in every language" if ok else
                         f" -> NOT within {within:g} points (worst {worst:+.2f})"))
    return {"rows": rows, "languages": langs, "within_points": within, "answer": answer,
            "markdown": "\n".join(md) + "\n"}


SCORE_NOTE = ("Score: mean over languages of each file's score, ×100: the mean of the macro recalls of at and isAt "
              "(literary works: of at alone, as the campaign scores them). Binary: PROBABLE counted as TRUE. "
              "In brackets: 95 % bootstrap interval over documents (1000 seeded resamples). A parse failure counts "
              "as FALSE/FALSE.")


def _layout_note(distill_cfg: DistillSection) -> str:
    n = distill_cfg.max_chars
    if distill_cfg.prompt_layout in ("marked", "facts"):
        facts = (", then one sentence of where the whole article mentions them (how often each, how many words "
                 "apart at their closest, one sentence or not)") if distill_cfg.prompt_layout == "facts" else ""
        return (f"Prompt layout `{distill_cfg.prompt_layout}`: the definitions first, then at most {n} characters of "
                "the article around the place where the pair's person and place come closest (two stretches when "
                f"they are farther apart), every mention marked <person>…</person> / <place>…</place>{facts}, "
                "then the pair.")
    whose = "the document's pairs" if distill_cfg.prompt_layout == "article" else "the pair"
    return (f"Prompt layout `{distill_cfg.prompt_layout}`: articles longer than {n} characters are shown as the excerpt "
            f"of that length that covers the most mentions of {whose} (cut at whitespace, marked with …).")


def write_report(folder: DistillFolder, recipe: DistillRecipe) -> Path:
    """report.md of a distillation run: splits, the prompt comparison, teacher, traces kept per
    language and label, students, the efficiency–accuracy table with ranks, and the answer to
    'does the student stay within N points of the teacher in every language'."""
    distill_cfg = recipe.distill
    lines = [f"# glotkit run `{recipe.name}` (HIPE-2026 distillation)", "",
             f"Teacher `{recipe.model.name}`{' (NF4, QLoRA)' if recipe.model.quantization == 'nf4' else ''} with LoRA "
             f"r={recipe.lora.r}, alpha={recipe.lora.resolved_alpha():g}, targets {recipe.lora.target_modules}; "
             f"students: " + ", ".join(f"`{s.name}` = `{s.model}`{' with a trimmed vocabulary' if s.trim_vocab else ''}"
                                        for s in distill_cfg.students) + f"; {distill_cfg.level}-level distillation.",
             _layout_note(distill_cfg)]
    split = folder.read_json(folder.split_summary)
    if split:
        lines += ["", "## Data", "", "Seeded split by document of the gold train files (test documents are never "
                  "trained on nor used to pick prompts); pairs are a seeded sample per language.", "",
                  "| split | " + " | ".join(sorted(split["train"])) + " |", "|---|" + "---:|" * len(split["train"])]
        for name, per in split.items():
            lines.append(f"| {name} | " + " | ".join(f"{per[x]['documents']} docs / {per[x]['pairs']} pairs"
                                                     if x in per else "–" for x in sorted(split["train"])) + " |")
        if "silver" in split:
            lines.append("")
            lines.append("The silver (automatically annotated `sandbox/`) pairs were added to the teacher's training.")
    table = folder.compare_table
    if table.is_file():
        lines += ["", "## 1. Prompt comparison (dev split, untuned models)", "", table.read_text(encoding="utf-8").rstrip(),
                  "", SCORE_NOTE]
    teach = folder.read_json(folder.train_result(folder.teacher_train))
    traces = folder.read_json(folder.traces_summary)
    if teach or traces:
        lines += ["", "## 2. Teacher and its traces", ""]
        if teach:
            lines.append(f"- teacher ({distill_cfg.teacher_format} answers on the gold labels): {teach['examples']} examples, "
                         f"{teach['steps']} steps in {teach['seconds']:.0f} s, {teach['tokens_per_s']:.0f} tokens/s, "
                         f"final loss {teach['final_loss']}")
        curve = _read_jsonl(folder.teacher_curve) if folder.teacher_curve.is_file() else []
        if curve:
            langs = sorted({x for r in curve for x in r["languages"]})
            lines += ["", "The teacher on the dev split after each epoch (`dev_curve`):", "",
                      "| epoch | step | score | " + " | ".join(langs) + " | labels chosen |",
                      "|---:|---:|---:|" + "---:|" * len(langs) + "---|"]
            lines += [f"| {r['epoch']} | {r['step']} | {with_ci(r['score'], r['ci'])} | "
                      + " | ".join(with_ci(r["languages"][x]["score"], r["languages"][x]["ci"]) if x in r["languages"]
                                   else "–" for x in langs)
                      + " | " + ", ".join(f"{k} {v}" for k, v in sorted(r["chosen"].items(), key=lambda kv: -kv[1]))
                      + " |" for r in curve]
            lines.append("")
        if traces:
            lines.append(f"- traces: the teacher explains each gold label (given in the prompt), then answers again "
                         f"after its explanation without it; **{traces['kept']} of {traces['written']} kept** "
                         f"({traces['new_tokens']} tokens in {traces['seconds']:.0f} s, {traces['tokens_per_s']} tokens/s)")
            if "kept_not_false_false" in traces:
                ra = traces["rationales"]
                lines.append(f"- {traces['kept_not_false_false']} of the {traces['kept']} kept traces are not FALSE/FALSE; "
                             f"of {ra['checked']} usable explanations {ra['person']} name the person, {ra['place']} the "
                             f"place and {ra['grounded']} quote or paraphrase the article"
                             + (" (traces failing these checks are dropped)" if distill_cfg.trace_check else ""))
            lines += ["", "| source:language | written | kept | dropped | kept per label (at/isAt) |", "|---|---:|---:|---|---|"]
            for k, v in sorted(traces["counts"].items()):
                lines.append(f"| {k} | {v['written']} | {v['kept']} | "
                             + ", ".join(f"{r}: {n}" for r, n in v["dropped"].items())
                             + " | " + ", ".join(f"{lab} {c['kept']}/{c['written']}" for lab, c in sorted(v["by_label"].items()))
                             + " |")
            sample = _read_jsonl(folder.traces_file)[:3]
            if sample:
                lines += ["", "Sample traces:", ""]
                lines += [f"- {t['language']} {t['at']}/{t['isAt']}: {t['explanation'][:300]}" for t in sample]
    studs = [(s.name, folder.read_json(folder.train_result(folder.student_train(s.name)))) for s in distill_cfg.students]
    if any(r for _, r in studs):
        lines += ["", "## 3. Students", ""]
        for name, r in studs:
            if r:
                trim = folder.read_json(folder.student_model(name) / "glotkit-trim.json")
                extra = (f"; vocabulary trimmed {trim['vocab_before']:,} -> {trim['vocab_after']:,} tokens, "
                         f"{trim['params_before']:,} -> {trim['params_after']:,} parameters" if trim else "")
                lines.append(f"- `{name}`: {r['examples']} traces, {r['steps']} steps in {r['seconds']:.0f} s, "
                             f"{r['tokens_per_s']:.0f} tokens/s, final loss {r['final_loss']}{extra}")
    eff = folder.read_json(folder.table_json)
    if eff:
        lines += ["", "## Efficiency and accuracy (held-out test split)", "", eff["markdown"].rstrip(), "",
                  "Params: the model's plus the adapter's. Disk: the weight files shipped (model safetensors + "
                  "adapter). Peak RSS: a process that loads only this model and labels the test pairs (`served`: the "
                  "model answered from a server (`generate.backend: openai`), whose memory is not measured here; its "
                  "pairs/s is the server's, with `generate.concurrency` requests in flight). Ranks as in "
                  "HIPE-2026: by accuracy, by parameters, by size, and by the mean of the three (1 = best). "
                  + SCORE_NOTE, "",
                  f"**Does the student stay within {eff['within_points']:g} points of the teacher in every language?**", ""]
        lines += [f"- {a}" for a in eff["answer"]] or ["- no student was evaluated"]
        refs = eff.get("references")
        if refs:
            langs = eff["languages"]
            lines += ["", "What a model must beat (same test pairs; the regression is fit on the teacher's training "
                      "pairs, on where the person and the place are mentioned — words between their closest mentions, "
                      "one sentence or not, how often and how early each occurs, the article's length, the pairs in "
                      "the document, the language — never on what the article says):", "",
                      "| reference | " + " | ".join(langs) + " | overall | binary |", "|---|" + "---:|" * (len(langs) + 2)]
            lines += [f"| {name} | " + " | ".join(with_ci(r["languages"][x]["score"], r["languages"][x]["ci"])
                                                  if x in r["languages"] else "–" for x in langs)
                      + f" | **{with_ci(r['score'], r['ci'])}** | {with_ci(r['binary'], r['binary_ci'])} |"
                      for name, r in refs.items()]
        calibrated = [r for r in eff["rows"] if r.get("calibration")]
        if calibrated:
            lines += ["", "Label decisions calibrated on the dev split (`calibrate`: offsets added to the five option "
                      "scores, fit to the dev score; the test answers keep their raw scores, so the test score "
                      "without the offsets is known too):", ""]
            lines += [f"- `{r['label']}`: dev {c['dev_score'] * 100:.2f} -> {c['dev_score_calibrated'] * 100:.2f} "
                      f"({c['dev_pairs']} pairs); test without calibration "
                      f"{with_ci(c['test_uncalibrated']['score'], c['test_uncalibrated']['ci'])}, with "
                      f"{with_ci(r['score'], r['ci']['score'])}; offsets "
                      + ", ".join(f"{k} {v:+g}" for k, v in c["offsets"].items())
                      for r in calibrated for c in [r["calibration"]]]
        lines += _confusions(folder, [r["label"] for r in eff["rows"] if r["role"] in ("teacher", "student")])
    lines.append("")
    atomic_write_text(folder.report, "\n".join(lines))
    return folder.report


def _confusions(folder: DistillFolder, labels) -> list[str]:
    """Per-label confusion matrices (gold rows, predicted columns), summed over the languages."""
    out = ["", "### Confusion matrices (test split, all languages; rows gold, columns predicted)", ""]
    for label in labels:
        r = folder.read_json(folder.evaluation(label) / "result.json")
        if not r:
            continue
        for rel in ("at", "isAt"):
            scored = [v for v in r["languages"].values() if rel in v["confusion"]]  # isAt: not on literary works
            if not scored:
                continue
            names = scored[0]["confusion"][rel]["labels"]
            total = [[sum(v["confusion"][rel]["matrix"][i][j] for v in scored) for j in range(len(names))]
                     for i in range(len(names))]
            out += [f"`{label}`, {rel}:", "", "| gold \\ predicted | " + " | ".join(names) + " |",
                    "|---|" + "---:|" * len(names)]
            out += [f"| {g} | " + " | ".join(str(x) for x in row) + " |" for g, row in zip(names, total)]
            out.append("")
    return out


# --------------------------------------------------------------------------- glotkit distill score


def score_arguments(p) -> None:
    p.add_argument("gold", help="the gold HIPE-2026 JSONL file (e.g. HIPE-2026-v1.0-impresso-test-de.jsonl)")
    p.add_argument("predictions", help="the predictions JSONL file: the same documents and pairs, labels filled in")
    p.add_argument("--json", action="store_true", help="print the figures as JSON, full precision")
    p.add_argument("--targets", default=None, metavar="at|at,isAt",
                   help="the labels scored (default: the campaign's for the data set: at and isAt for the "
                        "newspapers, at alone for the literary works of the surprise set)")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples of the documents for the 95 %% intervals (0: none; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    p.add_argument("--schema", default=None, metavar="FILE",
                   help="the release's JSON schema (default: ../shared/data/hipe-2026/schemas)")


def score_command(args) -> int:
    """``glotkit distill score GOLD PRED``: print the official figures (text or ``--json``)."""
    from glotkit.hipe.score import parse_targets, score_prediction_files

    if args.resamples < 0:
        raise GlotkitError(f"--resamples {args.resamples}: give 0 (no intervals) or more")
    targets = parse_targets(args.targets, "--targets") if args.targets is not None else None
    r = score_prediction_files(args.gold, args.predictions, targets, resamples=args.resamples, seed=args.seed,
                               schema=args.schema or "default")
    notes = score_notes(r)
    if args.json:
        for n in notes:
            say(f"note: {n}")
        print(json.dumps(r, indent=2, ensure_ascii=False))
    else:
        print(score_text(r, notes))
    return 0


def score_notes(r: dict) -> list[str]:
    """What the scorer filled in or left out, in words."""
    per = r["languages"].values()
    missing, pairs = sum(x["missing_pairs"] for x in per), sum(x["pairs"] for x in per)
    whole = sum(x["missing_documents"] for x in per)
    nulls, extra = sum(x["null_labels"] for x in per), sum(x["extra_pairs"] for x in per)
    notes = []
    if missing:
        notes.append(f"{missing} of {pairs} gold pairs are not in the predictions"
                     + (f" ({whole} whole documents missing)" if whole else "")
                     + ": counted FALSE/FALSE, as the official scorer does")
    if nulls:
        notes.append(f"{nulls} predicted labels are null: counted FALSE")
    if extra:
        notes.append(f"{extra} predicted pairs are not in the gold file: not scored")
    if not r["schema_checked"]:
        notes.append("no HIPE-2026 schema found (give --schema): the files were not checked against it")
    return notes


def score_text(r: dict, notes: Sequence[str] = ()) -> str:
    """The figures of :func:`glotkit.hipe.score.score_prediction_files`: one column per language
    (and the profile, the mean over languages, when there are several), each value with its
    interval."""
    per = r["languages"]

    def cell(value, interval) -> str:
        if value is None:
            return "null"
        return f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")

    ci = _ci

    figures = [("at macro recall", lambda x: (x["at_macro_recall"], ci(x, "at_macro_recall"))),
               ("isAt macro recall", lambda x: (x["isAt_macro_recall"], ci(x, "isAt_macro_recall"))),
               ("file score", lambda x: (x["score"], ci(x, "score"))),
               ("binary at macro recall", lambda x: (x["binary"]["at_macro_recall"], ci(x, "binary", "at_macro_recall"))),
               ("binary file score", lambda x: (x["binary"]["score"], ci(x, "binary", "score")))]
    cols = [(lang, [cell(*f(x)) for _, f in figures]) for lang, x in per.items()]
    if len(per) > 1:
        p = r["profile"]
        cols.append(("profile (mean)", ["", "", cell(p["score"], ci(p, "score")), "",
                                        cell(p["binary_score"], ci(p, "binary_score"))]))
    widths = [max(len(name), *(len(v) for v in vals)) for name, vals in cols]
    lines = [f"gold:        {r['gold']}", f"predictions: {r['predictions']}"]
    for lang, x in per.items():
        lines.append(f"{lang}: {x['documents']} documents, {x['pairs']} pairs; targets {', '.join(x['targets'])} "
                     f"({x['targets_from']})")
    meta = r["profile"].get("ci")
    lines.append("")
    if meta:
        lines.append(f"{meta['level'] * 100:g} % intervals: percentile bootstrap over documents, {meta['resamples']} "
                     f"resamples, seed {meta['seed']}")
    lines.append(f"{'':<24}" + "  ".join(f"{name:>{w}}" for (name, _), w in zip(cols, widths)))
    for i, (name, _) in enumerate(figures):
        lines.append(f"{name:<24}" + "  ".join(f"{vals[i]:>{w}}" for (_, vals), w in zip(cols, widths)))
    if any(x["isAt_macro_recall"] is None for x in per.values()):
        lines.append("null: not a target of this data set (the literary works are scored on at alone)")
    return "\n".join([x.rstrip() for x in lines] + [f"note: {n}" for n in notes])


# --------------------------------------------------------------------------- submissions


def predict_arguments(p) -> None:
    p.add_argument("run", help="a distillation run folder (its config.yaml and adapters)")
    p.add_argument("--model", default="teacher", metavar="ROLE",
                   help="teacher (default), student.NAME, or base / student.NAME.base for an untuned model")
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="a HIPE-2026 file (labels may be null)")
    p.add_argument("--output", required=True, metavar="FILE.jsonl", help="the predictions file to write")
    p.add_argument("--schema", default=None, help="the HIPE-2026 JSON schema (default: the one in ../shared/data)")
    p.add_argument("--no-progress", action="store_true")


def predict_command(args, log: Callable[[str], None] = say) -> int:
    """``glotkit distill predict RUN --model ROLE --input FILE --output FILE``: every pair of the
    input labelled by one of the run's models (its format and label decision from the run's
    recipe), written as the input's documents with the labels filled in (same document and pair
    ids, same order) and checked against the schema.  Answers are appended to
    ``OUTPUT.partial.jsonl`` as they come, so an interrupted run continues; the predictions file
    is written whole at the end.  A role with a served name in the run's ``generate`` answers from
    the server."""
    import time

    from glotkit.config import ModelSection
    from glotkit.hipe.data import read_hipe, write_predictions
    from glotkit.hipe.predict import predict_pairs
    from glotkit.systems import load_recipe
    from glotkit.systems.runner import owned

    run_dir, src, out = Path(args.run), Path(args.input), Path(args.output)
    if not (run_dir / "config.yaml").is_file():
        raise GlotkitError(f"{run_dir}: not a run folder (no config.yaml)")
    recipe = load_recipe(run_dir / "config.yaml")
    if not isinstance(recipe, DistillRecipe):
        raise GlotkitError(f"{run_dir}: a run of system '{recipe.system}', not of distill")
    entries = {e["served_as"]: e for e in _entries(recipe.model_copy(
        update={"distill": recipe.distill.model_copy(update={"untuned": True})}), run_dir)}
    if args.model not in entries:
        raise GlotkitError(f"--model {args.model}: not a model of this run (models: {', '.join(entries)})")
    e = entries[args.model]
    if e["adapter"] and not (Path(e["adapter"]) / "adapter_config.json").is_file():
        raise GlotkitError(f"{e['adapter']}: no adapter for '{e['label']}' in {run_dir}; run its stages first")
    if out.resolve() == src.resolve():
        raise GlotkitError(f"--output {out}: is the input file; give another name")
    if out.is_dir():
        raise GlotkitError(f"--output {out}: is a folder; give a file name")
    docs = read_hipe(src, schema=args.schema or "default")
    items = [(d, p) for d in docs for p in d["sampled_pairs"]]
    if not items:
        raise GlotkitError(f"{src}: no pairs to label")
    settings = _settings(recipe, e["format"])
    calibration = _folder(run_dir).calibration(e["label"])
    if settings.labels == "loglik" and calibration.is_file():  # the decision the run's table measured
        settings.offsets = json.loads(calibration.read_text(encoding="utf-8"))["offsets"]
        log(f"predict: the decision of '{e['label']}' is calibrated ({calibration})")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.jsonl")
    with owned(out.parent, f"glotkit distill predict -> {out.name}", lock_name=f".{out.name}.lock"):
        connect = _connector(recipe, e["served_as"], log, "predict", optional=True)
        if connect is not None:
            generator = connect()
            from glotkit.models.loading import tokenizer_for

            generator.tokenizer = tokenizer_for(ModelSection(**e["model"]), log=log)
        else:
            from glotkit.generate.local import LocalGenerator
            from glotkit.models.loading import load_model

            model, tok, device = load_model(ModelSection(**e["model"]), log=log)  # as the evaluation loads it
            if e["adapter"]:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, e["adapter"])
            generator = LocalGenerator(model, tok, device)
        log(f"predict: {len(items)} pairs of {len(docs)} documents with '{e['label']}' ({e['format']}, labels by "
            f"{settings.labels})")
        t0 = time.perf_counter()
        rows, timing = predict_pairs(generator, items, settings, partial=partial, progress=not args.no_progress,
                                     desc=f"predict ({e['label']})", log=log)
        labels = {tuple(r["key"]): (r["at"], r["isAt"]) for r in rows}
        write_predictions(out, docs, labels)
        read_hipe(out, schema=args.schema or "default")  # what is sent must pass the campaign's schema
        partial.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[f"{r['at']}/{r['isAt']}"] = counts.get(f"{r['at']}/{r['isAt']}", 0) + 1
    fails = sum(not r["parsed"] for r in rows)
    log(f"predict: wrote {out} ({len(docs)} documents, {len(rows)} pairs) in {time.perf_counter() - t0:.0f} s; "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        + (f"; {fails} answers not parsed (FALSE/FALSE)" if fails else ""))
    return 0
