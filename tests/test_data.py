"""Data readers: SQuAD JSON, JSONL, CSV, a saved datasets folder; split by context."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import SHARED
from glotkit.config import DataSection
from glotkit.data.qa import load_qa_data, read_examples, split_by_context


def _squad(path):
    doc = {"version": "1.1", "data": [{"title": "Sibiu", "paragraphs": [
        {"context": "Sibiu este pe râul Cibin.", "qas": [
            {"id": "a", "question": "Pe ce râu?", "answers": [{"text": "Cibin", "answer_start": 19},
                                                            {"text": "râul Cibin", "answer_start": 14}]}]}]}]}
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def test_squad_reader_keeps_all_gold_answers(tmp_path):
    ex = read_examples(_squad(tmp_path / "s.json"), DataSection())
    assert len(ex) == 1 and ex[0].answers == ["Cibin", "râul Cibin"] and ex[0].id == "a"


def test_jsonl_and_csv_with_custom_fields(tmp_path):
    rows = [{"uid": str(i), "passage": f"Orașul {i} e pe Mureș.", "q": "Pe ce râu?", "a": "Mureș"} for i in range(4)]
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    c = tmp_path / "d.csv"
    with c.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = DataSection(context_field="passage", question_field="q", answer_field="a", id_field="uid")
    for path in (j, c):
        ex = read_examples(path, cfg)
        assert [e.id for e in ex] == ["0", "1", "2", "3"] and ex[2].context == "Orașul 2 e pe Mureș."


def test_saved_datasets_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"context": ["Iași e în Moldova.", "Cluj e în Transilvania."], "question": ["Unde e Iași?", "Unde e Cluj?"],
            "answer": ["Moldova", "Transilvania"]}
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(tmp_path / "ds")
    ex = read_examples(tmp_path / "ds", DataSection(), role="test")
    assert [e.answer for e in ex] == ["Moldova", "Transilvania"]


def test_split_by_context_is_seeded_and_has_no_leakage(tmp_path):
    rows = [{"context": f"ctx {i // 3}", "question": f"q{i}", "answer": "ctx"} for i in range(60)]
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    d1 = load_qa_data(DataSection(train=str(j), test_ratio=0.25), seed=3)
    d2 = load_qa_data(DataSection(train=str(j), test_ratio=0.25), seed=3)
    assert [e.id for e in d1.test] == [e.id for e in d2.test]
    assert not {e.context for e in d1.train} & {e.context for e in d1.test}
    assert len(d1.test) == 15


def test_demo_data_is_well_formed():
    """The shipped demo set: ≥150/50, answers are spans, comma-below diacritics, split by context."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes" / "data" / "ro-qa"
    train = read_examples(root / "train.jsonl", DataSection())
    test = read_examples(root / "test.jsonl", DataSection())
    assert len(train) >= 150 and len(test) >= 50
    for e in train + test:
        assert e.answer in e.context, e.id
        assert not set("şŞţŢ") & set(e.context + e.question + e.answer), e.id
    assert not {e.context for e in train} & {e.context for e in test}


@pytest.mark.integration
def test_xquad_ro_reads():
    path = SHARED / "data" / "xquad" / "xquad.ro.dev.json"
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared/data is needed for this test)")
    ex = read_examples(path, DataSection())
    assert len(ex) == 786  # articles 1–30 of XQuAD (see ../shared/data/README.md)
    train, test = split_by_context(ex, 0.2, 42)
    assert len({e.context for e in test}) == 30  # 20% of 150 paragraphs
    assert not {e.context for e in train} & {e.context for e in test}
