"""Contextual QA examples: read them from SQuAD JSON, JSONL, CSV or a saved ``datasets`` folder.

Everything is validated on load: a missing file, a missing column, an empty data set or a
malformed line is a :class:`GlotkitError` naming the file, the line and the field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from glotkit.config import DataSection
from glotkit.errors import GlotkitError
from glotkit.io import check_unique, iter_jsonl_objects, read_csv_records, read_json_file


@dataclass
class QAExample:
    """One (context, question, answers) triple; ``answers`` holds every accepted gold answer."""

    id: str
    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The answer the model is trained to write (the first gold answer)."""
        return self.answers[0]


@dataclass
class QAData:
    train: list[QAExample]
    test: list[QAExample]
    warnings: list[str]


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        return "squad"
    raise GlotkitError(f"{path}: cannot tell the format from the name; set data.format (squad, jsonl, csv, hf)")


def _answers_of(value: Any, where: str, field_name: str) -> list[str]:
    if isinstance(value, str):
        answers = [value]
    elif isinstance(value, list):
        answers = [a["text"] if isinstance(a, dict) else a for a in value]
    elif isinstance(value, dict) and "text" in value:
        answers = value["text"] if isinstance(value["text"], list) else [value["text"]]
    else:
        raise GlotkitError(f"{where}: field '{field_name}' must be a string or a list of strings, got {value!r}")
    answers = [str(a).strip() for a in answers if a is not None and str(a).strip()]
    if not answers:
        raise GlotkitError(f"{where}: field '{field_name}' is empty")
    return answers


def _from_records(records: Iterable[tuple[str, dict[str, Any]]], path: Path, cfg: DataSection) -> list[QAExample]:
    """Build examples from ``(location, record)`` pairs using the configured field names; ids
    (the id field, or the record's number when it has none) must be unique."""
    needed = (cfg.context_field, cfg.question_field, cfg.answer_field)
    out: list[QAExample] = []
    locations: list[tuple[str, str]] = []
    for n, (loc, rec) in enumerate(records):
        where = f"{path}: {loc}"
        missing = [f for f in needed if f not in rec]
        if missing:
            present = ", ".join(sorted(map(str, rec))) or "none"
            raise GlotkitError(
                f"{where}: missing field '{missing[0]}' (fields present: {present}); "
                f"set data.{_role_of(missing[0], cfg)}_field"
            )
        for f in (cfg.context_field, cfg.question_field):
            if not isinstance(rec[f], str) or not rec[f].strip():
                raise GlotkitError(f"{where}: field '{f}' is empty or not text: {rec[f]!r}")
        answers = _answers_of(rec[cfg.answer_field], where, cfg.answer_field)
        ex_id = str(rec.get(cfg.id_field, n))
        meta = {k: v for k, v in rec.items() if k not in needed and k != cfg.id_field}
        out.append(QAExample(ex_id, rec[cfg.context_field], rec[cfg.question_field], answers, meta))
        locations.append((loc, ex_id))
    check_unique(locations, path, "id", f"; ids (field '{cfg.id_field}', set by data.id_field) must be unique")
    return out


def _role_of(field_name: str, cfg: DataSection) -> str:
    for role in ("context", "question", "answer"):
        if getattr(cfg, f"{role}_field") == field_name:
            return role
    return "answer"


def _read_squad(path: Path) -> list[QAExample]:
    doc = read_json_file(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise GlotkitError(f"{path}: not SQuAD v1.1 JSON (no top-level 'data' list); set data.format")
    out, locations = [], []
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            context = para.get("context")
            if not isinstance(context, str) or not context.strip():
                raise GlotkitError(f"{path}: data[{a}].paragraphs[{p}]: missing or empty 'context'")
            for q, qa in enumerate(para.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                if "question" not in qa or "answers" not in qa:
                    raise GlotkitError(f"{where}: missing field 'question' or 'answers'")
                answers = _answers_of(qa["answers"], where, "answers")
                title = article.get("title", "")
                out.append(QAExample(str(qa.get("id", f"{a}-{p}-{q}")), context, qa["question"], answers, {"title": title}))
                locations.append((f"data[{a}].paragraphs[{p}].qas[{q}]", out[-1].id))
    check_unique(locations, path, "id", "; question ids must be unique")
    return out


def _jsonl_records(path: Path):
    for lineno, rec in iter_jsonl_objects(path):
        yield f"line {lineno}", rec


def _csv_records(path: Path):
    records, _ = read_csv_records(path)
    for lineno, rec in records:
        yield f"line {lineno}", rec


def _hf_records(path: Path, role: str):
    try:
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a non-dataset folder
        raise GlotkitError(f"{path}: not a saved datasets folder ({type(err).__name__}: {err})") from None
    if isinstance(ds, DatasetDict):
        if role not in ds:
            raise GlotkitError(f"{path}: DatasetDict has no '{role}' split (splits: {', '.join(ds)})")
        ds = ds[role]
    for i, rec in enumerate(ds):
        yield f"row {i}", rec


def read_examples(path: str | Path, cfg: DataSection, role: str = "train") -> list[QAExample]:
    """Read one file or folder of QA examples."""
    path = Path(path)
    if not path.exists():
        raise GlotkitError(f"{path}: data file not found (data.{role})")
    fmt = _detect_format(path, cfg.format)
    if fmt == "squad":
        examples = _read_squad(path)
    elif fmt == "jsonl":
        examples = _from_records(_jsonl_records(path), path, cfg)
    elif fmt == "csv":
        examples = _from_records(_csv_records(path), path, cfg)
    else:
        examples = _from_records(_hf_records(path, role), path, cfg)
    if not examples:
        raise GlotkitError(f"{path}: no examples in the data set (data.{role})")
    return examples


def split_by_context(examples: list[QAExample], test_ratio: float, seed: int) -> tuple[list[QAExample], list[QAExample]]:
    """Seeded split that keeps all questions about one context on the same side (no leakage)."""
    contexts = sorted({ex.context for ex in examples})
    random.Random(seed).shuffle(contexts)
    n_test = max(1, round(len(contexts) * test_ratio))
    if n_test >= len(contexts):
        raise GlotkitError(
            f"data.test_ratio={test_ratio}: only {len(contexts)} distinct contexts, too few to split; give data.test"
        )
    test_ctx = set(contexts[:n_test])
    train = [ex for ex in examples if ex.context not in test_ctx]
    test = [ex for ex in examples if ex.context in test_ctx]
    return train, test


def answers_not_in_context(examples: list[QAExample]) -> int:
    return sum(1 for ex in examples if not any(a in ex.context for a in ex.answers))


def load_qa_data(cfg: DataSection, seed: int) -> QAData:
    """Load train and test examples as the recipe says, with warnings for suspicious data."""
    if not cfg.train and not cfg.test:
        raise GlotkitError("data.train: no data given (set data.train and optionally data.test)")
    warnings: list[str] = []
    train = read_examples(cfg.train, cfg, "train") if cfg.train else []
    if cfg.test:
        test = read_examples(cfg.test, cfg, "test")
    else:
        train, test = split_by_context(train, cfg.test_ratio, seed)
    if cfg.max_train:
        train = train[: cfg.max_train]
    if cfg.max_test:
        test = test[: cfg.max_test]
    for name, part in (("train", train), ("test", test)):
        bad = answers_not_in_context(part)
        if bad:
            warnings.append(f"data.{name}: {bad} of {len(part)} answers do not occur in their context")
    return QAData(train=train, test=test, warnings=warnings)
