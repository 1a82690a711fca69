"""The Romanian task suite: small declarative tasks, zero/k-shot prompts, two scoring modes.

A :class:`Task` names its data reader, prompt template, answer verbalization, metric and
``max_new_tokens``; nothing else in the engine knows about it, so a user task is one more
``Task(...)``.  Few-shot examples are drawn from the task's train split with a recorded seed
(the same seed gives the same demonstrations, whatever the batch size).

Scoring modes:

* ``generate``: greedy generation up to the task's stop strings (a newline; a blank line for
  summaries) and ``max_new_tokens`` (10 classification/regression, 250 QA, 2048 summaries),
  parsed by the task;
* ``loglik``: for classification and multiple choice, the option whose tokens have the highest
  summed log-likelihood after the prompt (what lm-evaluation-harness does); for regression, the
  expected value of the scores 0..5 under their probabilities.  Small base models need it, since
  they rarely answer with a bare label.  QA and summarization always generate.  Every result
  records the mode it came from.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from glotkit.config import SuiteSection, folder_name, template_fields
from glotkit.errors import GlotkitError
from glotkit.eval.uncertainty import fmt, fmt_change, method, paired_statistic, statistic_intervals
from glotkit.generate import Generator
from glotkit.io import read_json_file, read_table_records, read_user_text
from glotkit.logs import say

# max new tokens per task type, as in the RoQLlama paper; summaries stop at a blank line
DEFAULT_MAX_NEW_TOKENS = {"classification": 10, "regression": 10, "multichoice": 10, "qa": 250, "summarization": 2048}
DEFAULT_STOP = {"summarization": ("\n\n",)}
KINDS = tuple(DEFAULT_MAX_NEW_TOKENS)
MAIN_METRIC = {"classification": "macro_f1", "regression": "spearman", "multichoice": "exact_set_match",
               "qa": "f1", "summarization": "rougeL"}


@dataclass
class Task:
    """One task: where its data comes from, how a record becomes a prompt, how it is scored.

    ``load(source)`` gets the data root (built-in tasks) or the file the user named for the task
    and returns ``{"train": [...], "test": [...]}`` (records are dicts).  ``template`` is filled
    from a record and ends where the answer starts; ``answer(record)`` is the gold answer as text
    (demonstrations, and the options of log-likelihood scoring).  ``kind`` picks the parser and
    the metric: classification (``labels``), regression (a 0–5 number in ``score``), multichoice
    (letters, one or more correct, in ``answer``), qa (``answers``, EM/F1 of the core) or
    summarization (``summary``, ROUGE).
    """

    name: str
    kind: str
    description: str
    load: Callable[[Path], dict[str, list[dict]]]
    template: str
    answer: Callable[[dict], str]
    labels: list[str] = field(default_factory=list)  # classification: verbalized labels; multichoice: letters
    max_new_tokens: int | None = None  # None: the default of the kind
    stop: tuple[str, ...] | None = None  # generation stops at the first of these (None: a newline)
    needs_file: bool = False  # the data is the user's (--task-data NAME=FILE)
    cluster: str | None = None  # items sharing this field's value are resampled together (QA: the context)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GlotkitError(f"task '{self.name}': unknown kind '{self.kind}' (known: {', '.join(KINDS)})")
        if self.kind in ("classification", "multichoice") and not self.labels:
            raise GlotkitError(f"task '{self.name}': a {self.kind} task needs labels")
        if self.max_new_tokens is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[self.kind]
        if self.stop is None:
            self.stop = DEFAULT_STOP.get(self.kind, ("\n",))

    def fields(self) -> set[str]:
        return set(template_fields(self.template))

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.kind]

    def options(self) -> list[str]:
        """What log-likelihood scoring compares: the labels, or every set of one or two letters."""
        if self.kind == "multichoice":
            singles = list(self.labels)
            pairs = [f"{a}, {b}" for i, a in enumerate(singles) for b in singles[i + 1 :]]
            return singles + pairs
        return list(self.labels)

    def gold(self, record: dict):
        if self.kind == "classification":
            return self.answer(record)
        if self.kind == "regression":
            return float(record["score"])
        if self.kind == "multichoice":
            return frozenset(parse_letters(self.answer(record), self.labels) or ())
        if self.kind == "qa":
            return list(record["answers"])
        return record["summary"]

    def parse(self, generation: str):
        if self.kind == "classification":
            return parse_label(generation, self.labels)
        if self.kind == "regression":
            return parse_number(generation)
        if self.kind == "multichoice":
            letters = parse_letters(generation, self.labels)
            return frozenset(letters) if letters else None
        if self.kind == "qa":
            return generation.strip().split("\n", 1)[0].strip()
        return generation.strip()

    def score(self, preds: list, golds: list, language: str = "ro") -> dict:
        from glotkit.eval.metrics import classification_scores, correlation_scores, option_set_scores, rouge_scores

        if self.kind == "classification":
            m = classification_scores([p or "" for p in preds], golds, self.labels)
        elif self.kind == "regression":
            return correlation_scores(preds, golds, missing=2.5)
        elif self.kind == "multichoice":
            m = option_set_scores([set(p or ()) for p in preds], [set(g) for g in golds], self.labels)
        elif self.kind == "qa":
            from glotkit.eval.qa_metrics import aggregate, score_one

            m = aggregate([score_one(p or "", g, language) for p, g in zip(preds, golds)])
        else:
            m = rouge_scores([p or "" for p in preds], golds)
        m["unparsed"] = sum(p is None for p in preds)
        return m

    def statistic(self, preds: list, golds: list, language: str = "ro"):
        """The task's metrics on the items at an index array (for the bootstrap): the numbers
        :meth:`score` gives, from item-level forms of the same metrics.  Predictions and golds as
        :meth:`gold` / :meth:`parse` give them, or as a predictions file stores them (lists)."""
        from glotkit.eval import metrics as M

        if self.kind == "classification":
            return M.classification_statistic(preds, golds, self.labels)
        if self.kind == "regression":
            return M.correlation_statistic(preds, golds, missing=2.5)
        if self.kind == "multichoice":
            return M.option_set_statistic([set(p or ()) for p in preds], [set(g) for g in golds])
        if self.kind == "qa":
            from glotkit.eval.qa_metrics import score_one

            scores = [score_one(p or "", g, language) for p, g in zip(preds, golds)]
            return M.mean_statistic({k: [100 * getattr(x, k) for x in scores] for k in ("em", "f1", "em_raw", "f1_raw")})
        return M.mean_statistic(M.rouge_items([p or "" for p in preds], golds))

    def clusters(self, records: list[dict]) -> list | None:
        """What the bootstrap draws whole: the value of the task's ``cluster`` field per item (None: items)."""
        if not self.cluster or not records or self.cluster not in records[0]:
            return None
        return [r.get(self.cluster) for r in records]


def _seeded_split(rows: list[dict], test_size: int, seed: int = 0) -> dict[str, list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return {"test": [rows[i] for i in order[:test_size]], "train": [rows[i] for i in order[test_size:]]}


def _need(path: Path) -> Path:
    if not path.exists():
        raise GlotkitError(f"{path}: task data not found (../shared/data, or --data-root)")
    return path


def _load_laroseda(root: Path) -> dict[str, list[dict]]:
    doc = read_json_file(_need(root / "laroseda" / "laroseda_train.json"))
    rows = []
    for r in doc["reviews"]:
        stars = int(r["starRating"])
        if stars == 3:
            continue
        text = " ".join(f"{r.get('title', '')}. {r['content']}".split())[:1200]
        rows.append({"text": text, "label": "pozitivă" if stars >= 4 else "negativă"})
    return _seeded_split(rows, 1000)


_RONLI = ["contrast", "implicare", "consecință", "fără legătură"]  # labels 0..3 of RoNLI


def _load_ronli(root: Path) -> dict[str, list[dict]]:
    doc = read_json_file(_need(root / "ronli" / "validation.json"))
    rows = [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": _RONLI[int(r["label"])]} for r in doc]
    return _seeded_split(rows, 1000)


def _load_rosts(root: Path) -> dict[str, list[dict]]:
    def read(name):
        out = []
        for line in read_user_text(_need(root / "ro-sts" / "text-similarity" / name)).splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                out.append({"score": float(parts[0]), "s1": parts[1], "s2": parts[2]})
        return out

    return {"train": read("RO-STS.train.tsv"), "test": read("RO-STS.dev.tsv")}


# REDv2 label order (README of the data set), in Romanian
_RED = ["tristețe", "surpriză", "frică", "furie", "neutru", "încredere", "bucurie"]


def _load_red(root: Path) -> dict[str, list[dict]]:
    """REDv2 tweets whose agreed labels (≥ 2 of 3 annotators) name exactly one emotion: 477 of 543
    (62 with two and 4 with three agreed emotions are left out); 100 seeded ones are the shot pool."""
    doc = read_json_file(_need(root / "red" / "REDv2" / "valid.json"))
    rows = [{"text": " ".join(r["text"].split()), "label": _RED[r["agreed_labels"].index(1)]}
            for r in doc if sum(r["agreed_labels"]) == 1]
    split = _seeded_split(rows, len(rows) - 100)
    return split


def _read_juro_folder(folder: Path) -> list[dict]:
    import csv
    import io

    rows = []
    for path in sorted(_need(folder).rglob("*.csv")):
        reader = csv.reader(io.StringIO(read_user_text(path), newline=""))
        start = 1
        for rec in reader:
            lineno, start = start, reader.line_num + 1
            if not rec or not any(c.strip() for c in rec):
                continue
            if len(rec) != 4:
                raise GlotkitError(f"{path}: line {lineno}: expected 4 columns (subject, question, options, answer)")
            subject, question, options, answer = (c.strip() for c in rec)
            question = re.sub(r"^\d+\.\s*", "", " ".join(question.split()))
            opts = "\n".join(" ".join(line.split()) for line in options.splitlines() if line.strip())
            rows.append({"subject": subject, "question": question, "options": opts, "answer": ", ".join(answer)})
    return rows


def _load_juro(root: Path) -> dict[str, list[dict]]:
    """JuRO bar/magistracy exam questions: shots from train_set, test on validation_set."""
    return {"train": _read_juro_folder(root / "juro" / "train_set"), "test": _read_juro_folder(root / "juro" / "validation_set")}


def _load_xquad_ro(root: Path) -> dict[str, list[dict]]:
    """XQuAD-ro, split by context (seeded): 40 of 240 contexts give the shots, the rest is test,
    so a demonstration never shares its paragraph with the question."""
    from glotkit.config import DataSection
    from glotkit.data.qa import read_examples, split_by_context

    exs = read_examples(_need(root / "xquad" / "xquad.ro.dev.json"), DataSection(format="squad"), "test")
    test, train = split_by_context(exs, 40 / 240, seed=0)  # its held-out 40 contexts are our shot pool

    def rec(e):
        return {"context": e.context, "question": e.question, "answers": list(e.answers)}

    return {"train": [rec(e) for e in train], "test": [rec(e) for e in test]}


def read_located_records(path: Path, where: str) -> list[tuple[str, dict]]:
    """``(location, record)`` of a user's task file: JSONL, CSV or TSV (header row), or a JSON list;
    the location ("line N", or "record N" in a JSON list) is what errors name."""
    recs, _ = read_table_records(path, where)
    if not recs:
        raise GlotkitError(f"{path}: {where}: no records")
    return recs


def read_records(path: Path, where: str) -> list[dict]:
    """Records of a user's task file: JSONL, CSV or TSV (header row), or a JSON list."""
    return [r for _, r in read_located_records(path, where)]


def _load_summaries(path: Path) -> dict[str, list[dict]]:
    """A user's (text, summary) file; a seeded fifth (at most 50) is the shot pool."""
    if path.is_dir():
        raise GlotkitError("task 'summarization' needs your data: --task-data summarization=FILE "
                           "(JSONL/CSV/TSV with fields 'text' and 'summary')")
    located = read_located_records(path, "task 'summarization'")
    rows = [r for _, r in located]
    for i, (loc, r) in enumerate(located):
        missing = [f for f in ("text", "summary") if not str(r.get(f) or "").strip()]
        if missing:
            where = loc if loc.startswith("record") else f"{loc}, record {i + 1}"
            raise GlotkitError(f"{path}: {where}: missing or empty field '{missing[0]}' "
                               f"(fields: {', '.join(map(str, r))})")
    pool = min(50, len(rows) // 5)
    return _seeded_split([{"text": r["text"], "summary": r["summary"]} for r in rows], len(rows) - pool)


BUILTIN_TASKS: dict[str, Task] = {
    "sentiment": Task("sentiment", "classification", "LaRoSeDa product reviews (1–2 stars negative, 4–5 positive)",
                      _load_laroseda, "Recenzie: {text}\nRecenzia este pozitivă sau negativă? Răspuns:",
                      lambda r: r["label"], ["pozitivă", "negativă"]),
    "nli": Task("nli", "classification", "RoNLI sentence pairs, 4 relations",
                _load_ronli, "Propoziția 1: {premise}\nPropoziția 2: {hypothesis}\n"
                "Relația (contrast, implicare, consecință sau fără legătură):", lambda r: r["label"], list(_RONLI)),
    "emotion": Task("emotion", "classification", "REDv2 tweets with one agreed emotion (7 labels)",
                    _load_red, "Tweet: {text}\nEmoția (tristețe, surpriză, frică, furie, neutru, încredere "
                    "sau bucurie):", lambda r: r["label"], list(_RED)),
    "sts": Task("sts", "regression", "RO-STS similarity 0–5",
                _load_rosts, "Propoziția 1: {s1}\nPropoziția 2: {s2}\nSimilaritate (0-5):",
                lambda r: f"{r['score']:.1f}"),
    "legal-mcq": Task("legal-mcq", "multichoice", "JuRO legal exam questions, A–C, one or two correct "
                      "(stand-in for RoMedQA)", _load_juro,
                      "Întrebare ({subject}): {question}\n{options}\nRăspunsul corect (una sau două litere):",
                      lambda r: r["answer"], ["A", "B", "C"]),
    "qa": Task("qa", "qa", "XQuAD-ro extractive questions (EM/F1 of the core)", _load_xquad_ro,
               "Context: {context}\nÎntrebare: {question}\nRăspuns:", lambda r: r["answers"][0], cluster="context"),
    "summarization": Task("summarization", "summarization", "your (text, summary) data: --task-data summarization=FILE",
                          _load_summaries, "Text: {text}\nRezumat:", lambda r: r["summary"], needs_file=True),
}


_DATA_KEYS = ("file", "train", "test", "shots_pool", "seed")


def _whole_number(value, where: str, setting: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise GlotkitError(f"{where}: data.{setting}: expected a whole number ≥ 0, got {value!r}")
    return int(value)


def _regression_gold(value, path: Path, loc: str, where: str, field_name: str) -> float:
    """A regression task's gold value as a number ("3.5", 3.5, and the decimal comma "3,5")."""
    import math

    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and re.fullmatch(r"-?\d+,\d+", text):
        text = text.replace(",", ".")
    try:
        number = float(text) if not isinstance(text, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise GlotkitError(f"{path}: {loc}: field '{field_name}': {value!r} is not a number "
                           f"({where} is a regression task: its gold values are numbers)")
    return number


def task_from_spec(spec: dict, base_dir: Path = Path(".")) -> Task:
    """A user task from a mapping (YAML ``--task-file``): name, kind, template, answer (a field),
    labels, max_new_tokens, stop, and data: {file} (seeded split, ``shots_pool`` records) or
    {train, test}.  Loading checks every record: the answer and template fields are there, a
    regression task's gold values are numbers, ``shots_pool`` leaves a test split."""
    known = {"name", "kind", "description", "template", "answer", "labels", "max_new_tokens", "stop", "data"}
    where = f"task '{spec.get('name', '?')}'"
    unknown = sorted(set(spec) - known)
    if unknown:
        raise GlotkitError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    for key in ("name", "kind", "template", "answer", "data"):
        if key not in spec:
            raise GlotkitError(f"{where}: missing key '{key}'")
    data = spec["data"]
    if not isinstance(data, dict) or not ({"file"} <= set(data) or {"train", "test"} <= set(data)):
        raise GlotkitError(f"{where}: data must give 'file' (split with a seed) or 'train' and 'test'")
    unknown = sorted(set(map(str, data)) - set(_DATA_KEYS))
    if unknown:
        raise GlotkitError(f"{where}: data: unknown key '{unknown[0]}' (known: {', '.join(_DATA_KEYS)})")
    pool_setting = _whole_number(data["shots_pool"], where, "shots_pool") if "shots_pool" in data else None
    seed = _whole_number(data.get("seed", 0), where, "seed")
    answer_field = str(spec["answer"])
    kind = str(spec["kind"])
    try:
        folder_name(str(spec["name"]))  # it names the predictions file
    except ValueError as err:
        raise GlotkitError(f"{where}: name: {err}") from None
    try:
        fields_of_template = sorted(set(template_fields(str(spec["template"]))))
    except ValueError as err:
        raise GlotkitError(f"{where}: template: {err}") from None

    def check(path: Path, loc: str, r: dict) -> None:
        for f in [answer_field] + fields_of_template:
            if f not in r:
                role = "the answer field" if f == answer_field else "the template uses it"
                raise GlotkitError(f"{path}: {loc}: {where}: no field '{f}' ({role}; fields: {', '.join(map(str, r))})")
        if kind == "regression":
            r["score"] = _regression_gold(r[answer_field], path, loc, where, answer_field)
        elif kind == "qa":
            r["answers"] = r[answer_field] if isinstance(r[answer_field], list) else [r[answer_field]]
        elif kind == "summarization":
            r["summary"] = r[answer_field]

    def load(_root: Path) -> dict[str, list[dict]]:
        if "file" in data:
            path = base_dir / str(data["file"])
            recs = [(path, loc, r) for loc, r in read_located_records(path, where)]
            pool = min(50, len(recs) // 5) if pool_setting is None else pool_setting
            if pool >= len(recs):
                raise GlotkitError(f"{path}: {where}: data.shots_pool={pool} is too large: the file has {len(recs)} "
                                   f"records, and the pool must leave some for the test split (at most {len(recs) - 1})")
            split = _seeded_split(recs, len(recs) - pool, seed)
        else:
            split = {k: [(base_dir / str(data[k]), loc, r) for loc, r in read_located_records(base_dir / str(data[k]), where)]
                     for k in ("train", "test")}
        for rows in split.values():  # the kind's scorer reads fixed fields
            for path, loc, r in rows:
                check(path, loc, r)
        return {part: [r for _, _, r in rows] for part, rows in split.items()}

    def answer(r: dict) -> str:
        if kind == "regression":
            return f"{r['score']:.1f}"
        v = r[answer_field]
        return v[0] if isinstance(v, list) else str(v)

    stop = spec.get("stop")
    cluster = spec.get("cluster", "context" if kind == "qa" and "context" in fields_of_template else None)
    return Task(str(spec["name"]), kind, str(spec.get("description", "")), load, str(spec["template"]),
                answer, [str(x) for x in spec.get("labels", [])], spec.get("max_new_tokens"),
                tuple(stop) if isinstance(stop, list) else ((stop,) if stop else None),
                cluster=str(cluster) if cluster else None)


def load_task_file(path: str | Path) -> list[Task]:
    """Tasks defined in a YAML file: ``tasks: [{name, kind, template, answer, data, ...}, ...]``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: task file not found")
    try:
        doc = yaml.safe_load(read_user_text(path)) or {}
    except yaml.YAMLError as err:
        raise GlotkitError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    specs = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise GlotkitError(f"{path}: expected 'tasks:' with a list of task mappings")
    return [task_from_spec(s, path.parent) for s in specs]


def get_tasks(names: Sequence[str], extra: Sequence[Task] = ()) -> list[Task]:
    known = dict(BUILTIN_TASKS) | {t.name: t for t in extra}
    out = []
    for n in names:
        if n not in known:
            raise GlotkitError(f"--tasks: unknown task '{n}' (available: {', '.join(known)})")
        out.append(known[n])
    return out


def parse_shots(text: str | Sequence[int]) -> list[int]:
    try:
        shots = [int(k) for k in (text.split(",") if isinstance(text, str) else text)]
    except (ValueError, TypeError):
        raise GlotkitError(f"shots {text!r}: expected numbers like 0,1,3,5") from None
    if not shots or any(k < 0 for k in shots):
        raise GlotkitError(f"shots {text!r}: expected numbers ≥ 0 like 0,1,3,5")
    return shots


def parse_task_data(items: Sequence[str] | dict, tasks: Sequence[Task]) -> dict[str, Path]:
    """``["summarization=FILE", ...]`` (or a mapping) -> {task: path}, for the tasks being run."""
    pairs = list(items.items()) if isinstance(items, dict) else []
    for item in items if not isinstance(items, dict) else []:
        if "=" not in item:
            raise GlotkitError(f"--task-data {item!r}: expected TASK=FILE")
        pairs.append(tuple(item.split("=", 1)))
    names = {t.name for t in tasks}
    out = {}
    for name, file in pairs:
        if name not in names:
            raise GlotkitError(f"task data for '{name}': that task is not being run (tasks: {', '.join(sorted(names))})")
        if not Path(file).is_file():
            raise GlotkitError(f"{file}: data file of task '{name}' not found")
        out[name] = Path(file)
    return out


def resolve_suite(cfg: SuiteSection) -> tuple[list[Task], dict[str, Path], Path]:
    """The tasks of a suite (a recipe's ``suite:``, or ``glotkit eval``'s options as one), the data
    file of each task that takes the user's data, and the data root: checked, before any model
    is loaded."""
    extra = [t for f in cfg.task_files for t in load_task_file(f)]
    tasks = get_tasks(cfg.tasks, extra)
    task_data = parse_task_data(cfg.task_data, tasks)
    root = Path(cfg.data_root) if cfg.data_root else shared_data_root()
    for task in tasks:  # the user's data is read now, so that a bad record stops the run before a model loads
        if task.needs_file or task.name in task_data or any(task is t for t in extra):
            check_task_data(task, task.load(Path(task_data.get(task.name, root))), cfg.shots)
    return tasks, task_data, root


def check_task_data(task: Task, data: dict[str, list[dict]], shots: Sequence[int]) -> None:
    """A task's loaded data fits the suite: a test split, and a train split for the most shots."""
    if not data.get("test"):
        raise GlotkitError(f"task '{task.name}': empty test split")
    k, n = max(shots, default=0), len(data.get("train") or [])
    if k > n:
        raise GlotkitError(f"task '{task.name}': shots: k={k} is larger than the task's train split ({n} examples): "
                           "ask for fewer shots, or give the task more demonstrations")


def run_suite_for(cfg: SuiteSection, models: Sequence[tuple[str, Callable[[], Generator]]], out_dir: Path, *,
                  log: Callable[[str], None] = say, progress: bool = True) -> list[dict]:
    """The suite ``cfg`` for each (label, generator maker) of ``models`` in turn (a model is
    loaded or connected only when its turn comes); the results of all join in ``out_dir``.
    The recipes' ``suite`` stage and ``glotkit eval`` both run the suite through here."""
    tasks, task_data, root = resolve_suite(cfg)
    results: list[dict] = []
    for label, make in models:
        generator = make()
        log(f"task suite: {label}, tasks {', '.join(t.name for t in tasks)}, shots {cfg.shots}, "
            f"limit {cfg.limit}")
        results = run_suite(generator, tasks, shots=cfg.shots, seed=cfg.seed, mode=cfg.mode, limit=cfg.limit,
                            batch_size=cfg.batch_size, data_root=root, out_dir=out_dir, model_label=label,
                            task_data=task_data, log=log, progress=progress, shot_seeds=cfg.shot_seeds)
    return results


def shared_data_root() -> Path:
    """``../shared/data`` beside the checkout (or beside the working folder)."""
    here = Path(__file__).resolve().parents[3] / "shared" / "data"
    return here if here.is_dir() else Path("..") / "shared" / "data"


def check_template(task: Task, record: dict) -> None:
    missing = sorted(task.fields() - set(record))
    if missing:
        raise GlotkitError(f"task '{task.name}': template needs field '{missing[0]}', the data has: "
                           f"{', '.join(sorted(record))}")


def draw_shots(train: list[dict], k: int, seed: int, index: int) -> list[dict]:
    """k demonstrations for test item ``index``: a pure function of (seed, index)."""
    if k > len(train):
        raise GlotkitError(f"shots: k={k} is larger than the task's train split ({len(train)} examples)")
    return random.Random(seed * 100_003 + index).sample(train, k)


def answer_separator(template: str) -> str:
    """What goes between a filled template and its answer: a space, unless the template already
    ends in whitespace (then nothing, so the answer never follows a doubled space)."""
    return "" if template[-1:].isspace() else " "


def build_prompt(task: Task, record: dict, shots: list[dict]) -> str:
    sep = answer_separator(task.template)
    demos = [task.template.format(**s) + sep + task.answer(s) for s in shots]
    return "\n\n".join(demos + [task.template.format(**record)])


def split_continuation(prompt: str, option: str) -> tuple[str, str]:
    """The (context, continuation) that log-likelihood scoring compares for an option: the option
    after a space, as the demonstrations give it; a prompt's trailing whitespace moves into the
    continuation instead of being followed by a second space (what lm-evaluation-harness does
    with a context that ends in spaces)."""
    context = prompt.rstrip()
    tail = prompt[len(context):]
    return context, (tail or " ") + option


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label mentioned first in the generation (case-insensitive), or None."""
    low = text.casefold()
    hits = [(low.find(label.casefold()), label) for label in labels if label.casefold() in low]
    return min(hits)[1] if hits else None


def parse_number(text: str) -> float | None:
    m = re.search(r"-?\d+(?:[.,]\d+)?", text)
    return float(m.group(0).replace(",", ".")) if m else None


def parse_letters(text: str, letters: Sequence[str] = ("A", "B", "C")) -> set[str] | None:
    """The option letters a generation opens with: "A", "A, C", "AB", "B și C", "(A) și (B)".

    Only the start of the first non-blank line counts, so a letter inside a later sentence (or a
    capital "A" in Romanian prose after the answer) is not taken for an answer."""
    first = text.strip().split("\n", 1)[0]
    alt = "".join(re.escape(letter) for letter in letters)
    m = re.match(rf"[\s:(]*([{alt}](?:[\s,.)(&+/-]*(?:și|si|and|sau)?[\s,.)(]*[{alt}])*)(?![^\W\d_])", first)
    if not m:
        return None
    return set(re.findall(rf"[{alt}]", m.group(1)))


def test_items(task: Task, data: dict[str, list[dict]], limit: int | None) -> list[dict]:
    """The test records in a fixed shuffled order (so that ``--limit`` takes a sample, not the
    head of a sorted file), cut to ``limit``."""
    test = list(data["test"])
    random.Random(12345).shuffle(test)
    return test[:limit] if limit else test


def run_task(generator: Generator, task: Task, data: dict[str, list[dict]], *, shots: int, seed: int, mode: str,
             limit: int | None, batch_size: int, progress: bool = False, language: str = "ro") -> dict:
    """Score one task at one number of shots; returns metrics and per-item predictions.

    ``mode="loglik"`` applies to classification and multiple choice (the most likely option) and
    to regression (the expected value of the scores 0..5 under the model's probabilities); QA and
    summarization always generate.  The result's ``mode`` says which was used.  ``generator`` is
    the local model or a served one (sent the same prompt texts)."""
    import time

    t0 = time.perf_counter()
    test = test_items(task, data, limit)
    if not test:
        raise GlotkitError(f"task '{task.name}': empty test split")
    check_template(task, test[0])
    texts = [build_prompt(task, r, draw_shots(data["train"], shots, seed, i)) for i, r in enumerate(test)]
    ll: list[list[float]] | None = None
    options: list[str] = []

    def logliks(continuations: list[str]) -> list[list[float]]:
        # each option after a space, as it follows "...:" in the demonstrations (a prompt's trailing
        # whitespace becomes that space: see split_continuation); prompts grouped by that tail
        by_tail: dict[str, list[int]] = {}
        contexts = []
        for i, t in enumerate(texts):
            context, tail = split_continuation(t, "")
            contexts.append(context)
            by_tail.setdefault(tail, []).append(i)
        out: list = [None] * len(texts)
        for tail, members in by_tail.items():
            ids = [generator.tokenizer(contexts[i])["input_ids"] for i in members]
            rows = generator.option_logliks(ids, [tail + c for c in continuations], batch_size=batch_size,
                                            texts=[contexts[i] for i in members], progress=progress, desc=task.name)
            for i, row in zip(members, rows):
                out[i] = row
        return out

    prompt_ids = [generator.tokenizer(t)["input_ids"] for t in texts]
    if mode == "loglik" and task.kind in ("classification", "multichoice"):
        options = task.options()
        ll = logliks(options)
        best = [options[max(range(len(row)), key=row.__getitem__)] for row in ll]
        preds = [task.parse(b) for b in best]
        gens = [None] * len(test)
    elif mode == "loglik" and task.kind == "regression":
        # the expected value of the integer scores 0..5 under the model's probabilities of them
        import math

        values = list(range(6))
        options = [str(v) for v in values]
        ll = logliks(options)
        preds = []
        for row in ll:
            top = max(row)
            w = [math.exp(x - top) for x in row]
            preds.append(round(sum(v * x for v, x in zip(values, w)) / sum(w), 4))
        gens = [None] * len(test)
    else:
        mode = "generate"
        gens = generator.greedy(prompt_ids, max_new_tokens=task.max_new_tokens, batch_size=batch_size, stop=task.stop,
                                texts=texts, progress=progress, desc=task.name).texts
        preds = [task.parse(g) for g in gens]
    golds = [task.gold(r) for r in test]
    metrics = task.score(preds, golds, language)
    clusters = task.clusters(test)
    for name, ci in statistic_intervals(task.statistic(preds, golds, language), len(test), clusters, seed=seed).items():
        metrics[f"{name}_ci"] = [round(ci[0], 2), round(ci[1], 2)]

    def plain(v):
        return sorted(v) if isinstance(v, frozenset) else v

    def item(i, g, p, x):
        row = {"gold": plain(g), "prediction": plain(p), "generation": x}
        if ll is not None:  # what lm-evaluation-harness reports per option: the summed log-likelihood
            row["option_logliks"] = [round(v, 6) for v in ll[i]]
        return row

    return {"task": task.name, "kind": task.kind, "shots": shots, "mode": mode, "seed": seed,
            "backend": generator.backend,
            "batch_size": batch_size, "limit": limit, "template": task.template,
            "max_new_tokens": task.max_new_tokens, "main_metric": task.main_metric, "metrics": metrics,
            "ci_method": method(_unit(task) if clusters else "items", seed=seed),
            **({"options": options} if options else {}),
            "prompt_tokens_mean": round(sum(map(len, prompt_ids)) / len(prompt_ids), 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "predictions": [item(i, g, p, x) for i, (g, p, x) in enumerate(zip(golds, preds, gens))]}


def _unit(task: Task) -> str:
    return "contexts" if task.cluster == "context" else f"groups of equal '{task.cluster}'"


def _unit_key(r: dict) -> tuple:
    return (r["model"], r["task"], r["shots"], r["mode_asked"], r["limit"], r["seed"], r["template"], r["max_new_tokens"],
            tuple(r.get("shot_seeds_asked") or ()))


def unit_key(model_label: str, task: Task, shots: int, mode: str, limit: int | None, seed: int,
             shot_seeds: Sequence[int] = ()) -> tuple:
    """The identity of one (model, task, shots) result: what must match for it to be reused."""
    return (model_label, task.name, shots, mode, limit, seed, task.template, task.max_new_tokens,
            tuple(shot_seeds) if shots else ())


def _slug(model_label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_label).strip("_")


def predictions_path(out_dir: Path, model_label: str, task_name: str, shots: int) -> Path:
    return out_dir / f"predictions-{_slug(model_label)}-{task_name}-{shots}shot.jsonl"


def _paired_with(task: Task, ref: dict, preds: list[dict], test: list[dict], out_dir: Path, seed: int,
                 language: str = "ro") -> dict | None:
    """Every metric of this model minus the reference model's (the first model of the results on
    the same task, shots and settings), with its paired bootstrap interval over the same items."""
    from glotkit.io import read_jsonl

    path = predictions_path(out_dir, ref["model"], task.name, ref["shots"])
    if not path.is_file():
        return None
    theirs = read_jsonl(path)
    if [p["gold"] for p in theirs] != [p["gold"] for p in preds]:
        return None  # not the same items (another data version): no pairing

    def stat(rows):
        def value(v):
            return frozenset(v) if task.kind == "multichoice" and v is not None else v

        golds = [value(r["gold"]) for r in rows]
        return task.statistic([value(r["prediction"]) for r in rows], golds, language)

    diffs = paired_statistic(stat(theirs), stat(preds), len(preds), task.clusters(test), seed=seed)
    return {"against": ref["model"],
            "metrics": {k: {"difference": round(d["difference"], 2), "ci": [round(x, 2) for x in d["ci"]],
                            "significant": d["significant"]} for k, d in diffs.items()}}


def done_units(results_path: Path) -> set[tuple]:
    return {_unit_key(r) for r in json.loads(results_path.read_text(encoding="utf-8"))} if results_path.is_file() else set()


def run_suite(generator: Generator, tasks: Sequence[Task], *, shots: Sequence[int], seed: int, mode: str,
              limit: int | None, batch_size: int, data_root: Path, out_dir: Path, model_label: str,
              task_data: dict[str, Path] | None = None, log: Callable[[str], None] = say,
              progress: bool = True, shot_seeds: Sequence[int] = ()) -> list[dict]:
    """Every task at every number of shots for one model; results are added to ``results.json``
    in ``out_dir`` (a (model, task, shots) already there with the same settings is not redone,
    so an interrupted suite resumes and a second model's results join the first's), and
    ``results.md`` / ``results.png`` are rewritten over all models in the file."""
    from glotkit.io import atomic_write_json, atomic_write_jsonl

    out_dir.mkdir(parents=True, exist_ok=True)
    task_data = task_data or {}
    results_path = out_dir / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else []
    done = {_unit_key(r) for r in results}
    for task in tasks:
        # a task that needs the user's file and got none is given the data root; its loader says what to give
        source = Path(task_data[task.name]) if task.name in task_data else Path(data_root)
        data = None
        for k in shots:
            key = unit_key(model_label, task, k, mode, limit, seed, shot_seeds)
            if key in done:
                log(f"{task.name} {k}-shot for {model_label}: done before, kept")
                continue
            data = data if data is not None else task.load(source)
            r = run_task(generator, task, data, shots=k, seed=seed, mode=mode, limit=limit,
                         batch_size=batch_size, progress=progress)
            main = r["main_metric"]
            if k and shot_seeds:
                # the same items with other demonstrations: how much the draw alone moves the score
                values = {seed: r["metrics"][main]}
                for other in shot_seeds:
                    if other not in values:
                        values[other] = run_task(generator, task, data, shots=k, seed=other, mode=mode, limit=limit,
                                                 batch_size=batch_size, progress=progress)["metrics"][main]
                v = list(values.values())
                r["shot_seeds"] = {"metric": main, "seeds": list(values), "values": v, "min": min(v), "max": max(v),
                                   "sd": round(statistics.stdev(v), 2) if len(v) > 1 else 0.0}
            r["model"], r["mode_asked"], r["shot_seeds_asked"] = model_label, mode, list(key[-1])
            preds = r.pop("predictions")
            ref = next((x for x in results if x["model"] != model_label and _unit_key(x)[1:] == key[1:]), None)
            if ref is not None:
                paired = _paired_with(task, ref, preds, test_items(task, data, limit), out_dir, seed)
                if paired:
                    r["paired"] = paired
            atomic_write_jsonl(predictions_path(out_dir, model_label, task.name, k), preds)
            results.append(r)
            log(f"{task.name} {k}-shot ({r['mode']}), {model_label}: {main} "
                f"{fmt(r['metrics'][main], r['metrics'].get(main + '_ci'))}  (n={r['metrics']['n']})"
                + (f"; demonstration seeds {r['shot_seeds']['min']:.2f}–{r['shot_seeds']['max']:.2f}"
                   if "shot_seeds" in r else ""))
            atomic_write_json(results_path, results)
    write_suite_report(results, out_dir)
    return results


def suite_table(results: list[dict]) -> str:
    """Markdown: one row per (task, shots), one column per model, the main metric of each task with
    its 95 % interval (and, with --shot-seeds, the range over demonstration seeds); with two
    models, the difference of the second against the first with its paired interval, marked *
    where that interval excludes zero."""
    models = list(dict.fromkeys(r["model"] for r in results))
    cells = {(r["task"], r["shots"], r["model"]): r for r in results}
    rows = sorted({(r["task"], r["shots"]) for r in results}, key=lambda t: ([r["task"] for r in results].index(t[0]), t[1]))
    head = ["task", "shots", "mode", "metric"] + models + (["Δ"] if len(models) == 2 else []) + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for task, k in rows:
        rs = [cells.get((task, k, m)) for m in models]
        some = next(r for r in rs if r)
        main = some["main_metric"]
        vals = [r["metrics"][main] if r else None for r in rs]
        line = [task, str(k), "/".join(sorted({r["mode"] for r in rs if r})), main]
        for r, v in zip(rs, vals):
            cell = "–" if v is None else fmt(v, r["metrics"].get(main + "_ci"))
            if r and "shot_seeds" in r:
                cell += f" (seeds {r['shot_seeds']['min']:.2f}–{r['shot_seeds']['max']:.2f})"
            line.append(cell)
        if len(models) == 2:
            d = ((rs[1] or {}).get("paired") or {}).get("metrics", {}).get(main)
            if None in vals:
                line.append("–")
            elif d:
                line.append(fmt_change(d))
            else:
                line.append(f"{vals[1] - vals[0]:+.2f}")
        line.append(str(some["metrics"]["n"]))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def write_suite_report(results: list[dict], out_dir: Path) -> None:
    from glotkit.io import atomic_write_text

    if not results:
        return
    first = results[0]
    lines = ["# Task suite", "", f"seed {first['seed']}, batch size {first['batch_size']}, limit {first['limit']}; "
             "scores ×100; mode 'loglik' = the option with the highest log-likelihood, 'generate' = greedy "
             "generation parsed by the task", "", suite_table(results), "",
             "[…]: " + first.get("ci_method", method()) + " (QA: over contexts). Δ: second model "
             "minus first on the same items, paired bootstrap interval; * where it excludes zero."
             + (" (seeds a–b): the lowest and highest score over the demonstration seeds asked (--shot-seeds)."
                if any("shot_seeds" in r for r in results) else ""), ""]
    unparsed = [(r["model"], r["task"], r["shots"], r["metrics"]["unparsed"]) for r in results if r["metrics"].get("unparsed")]
    if unparsed:
        lines += ["Generations the task could not parse (scored as wrong): "
                  + "; ".join(f"{t} {k}-shot, {m}: {u}" for m, t, k, u in unparsed), ""]
    atomic_write_text(out_dir / "results.md", "\n".join(lines))
    _chart(results, out_dir / "results.png")


def _chart(results: list[dict], path: Path) -> None:
    """One panel per task: the main metric against shots, a line per model."""
    import math

    from glotkit.io import new_figure, save_figure

    tasks = list(dict.fromkeys(r["task"] for r in results))
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = new_figure(width=3.2 * cols, height=2.6 * rows, ncols=cols, nrows=rows)
    axes = list(getattr(axes, "flat", [axes]))
    for ax, name in zip(axes, tasks):
        rs = [r for r in results if r["task"] == name]
        for m in dict.fromkeys(r["model"] for r in rs):
            mine = sorted((r for r in rs if r["model"] == m), key=lambda r: r["shots"])
            ax.plot([r["shots"] for r in mine], [r["metrics"][r["main_metric"]] for r in mine], marker="o", label=m)
        ax.set_title(f"{name} ({rs[0]['main_metric']})", fontsize=8)
        ax.set_xlabel("shots", fontsize=7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(tasks):]:
        ax.axis("off")
    axes[0].legend(fontsize=6)
    save_figure(fig, path)
