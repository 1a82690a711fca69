"""Robustness of the data readers (issue 16): duplicate ids, invalid UTF-8, NUL bytes, CSV
dialects (Excel's byte-order mark, ';' / tab / '|' separators), the task suite's regression
gold values and shot pool.  Every error is one GlotkitError line naming the file, the line and
the value; nothing here loads a model."""

from __future__ import annotations

import json

import pytest

from glotkit.config import DataSection, SuiteSection
from glotkit.data.corpus import read_documents
from glotkit.data.pairs import read_anchors, read_pairs
from glotkit.data.qa import read_examples
from glotkit.errors import GlotkitError
from glotkit.eval.suite import load_task_file, resolve_suite
from glotkit.hipe.data import read_hipe
from glotkit.io import check_unique, iter_jsonl_objects, read_table, read_user_text


def _qa(i, qid=None):
    return {"id": qid if qid is not None else f"q{i}", "context": f"Orașul {i} e pe Mureș.", "question": "Pe ce râu?",
            "answer": "Mureș"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---------------------------------------------------------------- (A) duplicate ids


def test_duplicate_qa_ids_are_refused_in_jsonl_csv_and_squad(tmp_path):
    rows = [_qa(0), _qa(1, "q0"), _qa(2)]
    j = _jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(GlotkitError) as err:
        read_examples(j, DataSection(), "test")
    _one_line(err, "test.jsonl", "line 2", "duplicate id 'q0'", "first at line 1")
    c = tmp_path / "test.csv"
    c.write_text("id,context,question,answer\n" + "".join(f"{r['id']},{r['context']},{r['question']},{r['answer']}\n"
                                                          for r in rows), encoding="utf-8")
    with pytest.raises(GlotkitError) as err:
        read_examples(c, DataSection(), "test")
    _one_line(err, "test.csv", "line 3", "'q0'", "first at line 2")
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "Sibiu e pe Cibin.", "qas": [
        {"id": "a", "question": "Râul?", "answers": [{"text": "Cibin"}]},
        {"id": "a", "question": "Orașul?", "answers": [{"text": "Sibiu"}]}]}]}]}
    s = tmp_path / "squad.json"
    s.write_text(json.dumps(squad), encoding="utf-8")
    with pytest.raises(GlotkitError) as err:
        read_examples(s, DataSection(), "test")
    _one_line(err, "squad.json", "data[0].paragraphs[0].qas[1]", "duplicate id 'a'")


def test_generated_qa_ids_need_no_id_field(tmp_path):
    rows = [{k: v for k, v in _qa(i).items() if k != "id"} for i in range(3)]
    ex = read_examples(_jsonl(tmp_path / "d.jsonl", rows), DataSection(), "test")
    assert [e.id for e in ex] == ["0", "1", "2"]


def _hipe(doc_id, pairs=(("p1", "l1"),)):
    return {"document_id": doc_id, "text": "Herr Meier in Bern.",
            "sampled_pairs": [{"pers_entity_id": p, "loc_entity_id": lo, "pers_mentions_list": ["Meier"],
                               "loc_mentions_list": ["Bern"], "at": "TRUE", "isAt": "FALSE"} for p, lo in pairs]}


def test_hipe_duplicate_document_id_or_pair_is_refused(tmp_path):
    f = _jsonl(tmp_path / "h.jsonl", [_hipe("d1"), _hipe("d2"), _hipe("d1")])
    with pytest.raises(GlotkitError) as err:
        read_hipe(f, schema=None)
    _one_line(err, "h.jsonl", "line 3", "duplicate document_id 'd1'", "first at line 1")
    f = _jsonl(tmp_path / "h.jsonl", [_hipe("d1"), _hipe("d2", [("p1", "l1"), ("p2", "l1"), ("p1", "l1")])])
    with pytest.raises(GlotkitError) as err:
        read_hipe(f, schema=None)
    _one_line(err, "h.jsonl", "line 2: sampled_pairs[2]", "('p1', 'l1')", "first at line 2: sampled_pairs[0]")
    assert len(read_hipe(_jsonl(tmp_path / "ok.jsonl", [_hipe("d1"), _hipe("d2", [("p1", "l1"), ("p1", "l2")])]),
                         schema=None)) == 2


def test_check_unique_names_both_places(tmp_path):
    check_unique([("line 1", "a"), ("line 2", "b")], tmp_path / "x")
    with pytest.raises(GlotkitError, match=r"x: line 5: duplicate id 'a' \(first at line 1\)"):
        check_unique([("line 1", "a"), ("line 5", "a")], tmp_path / "x")


# ---------------------------------------------------------------- (B) invalid UTF-8


def test_invalid_utf8_names_file_line_and_byte_in_every_reader(tmp_path):
    good = json.dumps(_qa(0), ensure_ascii=False).encode()
    bad_line = '{"id": "q1", "context": "Ora'.encode() + "ş".encode("cp1250") + b'ul", "question": "x", "answer": "y"}'
    j = tmp_path / "d.jsonl"
    j.write_bytes(good + b"\n" + bad_line + b"\n")
    offset = len(good) + 1 + bad_line.index(b"\xba")
    with pytest.raises(GlotkitError) as err:
        read_examples(j, DataSection(), "test")
    _one_line(err, "d.jsonl", "line 2", f"byte {offset}", "not UTF-8")
    c = tmp_path / "d.csv"
    c.write_bytes(b"id,context,question,answer\nq0,Sibiu e pe Cibin.,R?,Cibin\nq1,Ora\xbaul,R?,x\n")
    with pytest.raises(GlotkitError) as err:
        read_examples(c, DataSection(), "test")
    _one_line(err, "d.csv", "line 3", "not UTF-8")
    s = tmp_path / "d.json"
    s.write_bytes(b'{"data": [\n{"title": "Ora\xbaul"}]}')
    with pytest.raises(GlotkitError) as err:
        read_examples(s, DataSection(), "test")
    _one_line(err, "d.json", "line 2", "not UTF-8")
    pairs = tmp_path / "p.csv"
    pairs.write_bytes(b"sent0,sent1\na,b\n\xff,c\n")
    with pytest.raises(GlotkitError) as err:
        read_pairs(pairs, "sent0", "sent1", where="pairs.positive")
    _one_line(err, "p.csv", "line 3", "byte 16")
    anchors = tmp_path / "a.txt"
    anchors.write_bytes(b"Prima.\nA doua \xe9.\n")
    with pytest.raises(GlotkitError) as err:
        read_anchors(anchors)
    _one_line(err, "a.txt", "line 2", "not UTF-8")
    h = tmp_path / "h.jsonl"
    h.write_bytes(json.dumps(_hipe("d1")).encode() + b"\n\xc3\x28\n")
    with pytest.raises(GlotkitError) as err:
        read_hipe(h, schema=None)
    _one_line(err, "h.jsonl", "line 2", "not UTF-8")
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"Unu.\nDoi.\nTrei \xe2\x82.\n")
    with pytest.raises(GlotkitError) as err:
        read_documents([corpus])
    _one_line(err, "c.txt", "line 3", "not UTF-8")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_bytes(b"tasks:\n  - name: x\xe9\n")
    with pytest.raises(GlotkitError) as err:
        load_task_file(tasks)
    _one_line(err, "tasks.yaml", "line 2", "not UTF-8")


def test_utf16_file_is_named_as_such(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(json.dumps(_qa(0)).encode("utf-16"))
    with pytest.raises(GlotkitError) as err:
        read_examples(f, DataSection(), "test")
    _one_line(err, "d.jsonl", "line 1", "UTF-16")


# ---------------------------------------------------------------- (C) CSV dialects, BOM, NUL


def test_excel_bom_csv_keeps_the_first_column(tmp_path):
    rows = [_qa(i) for i in range(3)]
    c = tmp_path / "excel.csv"
    c.write_text("id,context,question,answer\n" + "".join(f"{r['id']},{r['context']},{r['question']},{r['answer']}\n"
                                                          for r in rows), encoding="utf-8-sig")
    assert [e.id for e in read_examples(c, DataSection(), "test")] == ["q0", "q1", "q2"]
    c.write_text("context,question,answer\n" + "".join(f"{r['context']},{r['question']},{r['answer']}\n" for r in rows),
                 encoding="utf-8-sig")
    assert [e.context for e in read_examples(c, DataSection(), "test")] == [r["context"] for r in rows]
    _, fields = read_table(c, "x")
    assert fields == ["context", "question", "answer"]


def test_jsonl_and_json_tolerate_a_bom(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps(_qa(i), ensure_ascii=False) + "\n" for i in range(2)), encoding="utf-8-sig")
    assert [e.id for e in read_examples(j, DataSection(), "test")] == ["q0", "q1"]
    assert [n for n, _ in iter_jsonl_objects(j)] == [1, 2]
    s = tmp_path / "l.json"
    s.write_text(json.dumps([_qa(0)]), encoding="utf-8-sig")
    rows, fields = read_table(s, "x")
    assert rows[0]["id"] == "q0" and fields[0] == "id"


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_separator_is_sniffed(tmp_path, sep):
    rows = [_qa(i) for i in range(3)]
    rows[1]["context"] = "Orașul, cu virgulă, e pe Mureș."
    c = tmp_path / "d.csv"
    c.write_text(sep.join(rows[0]) + "\n" + "".join(sep.join(r.values()) + "\n" for r in rows), encoding="utf-8")
    ex = read_examples(c, DataSection(), "test")
    assert [e.id for e in ex] == ["q0", "q1", "q2"] and ex[1].context == rows[1]["context"]
    pairs = tmp_path / "p.csv"
    pairs.write_text(f"sent0{sep}sent1\nUnu, doi{sep}One, two\n", encoding="utf-8")
    assert read_pairs(pairs, "sent0", "sent1", where="pairs.positive") == [("Unu, doi", "One, two")]


def test_comma_csv_with_semicolons_in_the_text_stays_comma(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('id,context,question,answer\nq0,"Unu; doi; trei",Cât?,doi\nq1,"Patru; cinci",Cât?,cinci\n',
                 encoding="utf-8")
    ex = read_examples(c, DataSection(), "test")
    assert [e.context for e in ex] == ["Unu; doi; trei", "Patru; cinci"]


def test_ragged_csv_row_is_refused_with_its_line(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('id,context,question,answer\nq0,"Un context\npe două linii",R?,x\nq1,Sibiu, pe Cibin,R?,Cibin\n',
                 encoding="utf-8")
    with pytest.raises(GlotkitError) as err:
        read_examples(c, DataSection(), "test")
    _one_line(err, "d.csv", "line 4", "5 fields, the header has 4", "comma-separated")
    one = tmp_path / "a.csv"
    one.write_text("text\nSalut, lume\n", encoding="utf-8")
    with pytest.raises(GlotkitError) as err:
        read_anchors(one)
    _one_line(err, "a.csv", "line 2", "2 fields, the header has 1")


def test_nul_bytes_are_refused(tmp_path):
    c = tmp_path / "d.csv"
    c.write_bytes(b"id,context,question,answer\nq0,Sibiu e pe Cibin.,R?,Cibin\nq1,Sib\x00iu,R?,x\n")
    with pytest.raises(GlotkitError) as err:
        read_examples(c, DataSection(), "test")
    _one_line(err, "d.csv", "line 3", "NUL byte")
    j = tmp_path / "d.jsonl"
    j.write_bytes(json.dumps(_qa(0)).encode() + b"\n\x00\x00\n")
    with pytest.raises(GlotkitError) as err:
        read_examples(j, DataSection(), "test")
    _one_line(err, "d.jsonl", "line 2", "NUL byte")
    t = tmp_path / "c.txt"
    t.write_bytes(b"Unu.\x00\n")
    with pytest.raises(GlotkitError) as err:
        read_user_text(t)
    _one_line(err, "c.txt", "line 1", "byte 4")


# ---------------------------------------------------------------- (D) the task suite


def _task_file(tmp_path, kind="regression", data="{file: rows.jsonl}", extra=""):
    spec = tmp_path / "tasks.yaml"
    spec.write_text(f"tasks:\n  - name: sim\n    kind: {kind}\n    template: 'A: {{a}}\\nB: {{b}}\\nScor:'\n"
                    f"    answer: scor\n    data: {data}\n{extra}", encoding="utf-8")
    return spec


def test_regression_gold_must_be_a_number_when_the_task_is_read(tmp_path):
    rows = [{"a": f"x{i}", "b": f"y{i}", "scor": i % 5} for i in range(20)]
    rows[7]["scor"] = "mare"
    _jsonl(tmp_path / "rows.jsonl", rows)
    spec = _task_file(tmp_path)
    cfg = SuiteSection(tasks=["sim"], shots=[0], task_files=[str(spec)])
    with pytest.raises(GlotkitError) as err:
        resolve_suite(cfg)  # what the CLI and the recipes call before any model is loaded
    _one_line(err, "rows.jsonl", "line 8", "field 'scor'", "'mare' is not a number")
    rows[7]["scor"] = "3,5"  # a decimal comma (a Romanian spreadsheet) is a number
    _jsonl(tmp_path / "rows.jsonl", rows)
    (task,), _, _ = resolve_suite(cfg)
    data = task.load(tmp_path)
    assert 3.5 in [r["score"] for r in data["train"] + data["test"]]
    assert all(task.answer(r) == f"{r['score']:.1f}" for r in data["train"])


def test_regression_gold_in_a_csv_task_file(tmp_path):
    (tmp_path / "rows.csv").write_text("a;b;scor\n" + "".join(f"x{i};y{i};{i % 5}\n" for i in range(9)) + "x;y;\n",
                                       encoding="utf-8")
    spec = _task_file(tmp_path, data="{file: rows.csv, shots_pool: 2}")
    (task,) = load_task_file(spec)
    with pytest.raises(GlotkitError) as err:
        task.load(tmp_path)
    _one_line(err, "rows.csv", "line 11", "''")


def test_template_field_missing_in_a_record(tmp_path):
    rows = [{"a": f"x{i}", "b": f"y{i}", "scor": 1} for i in range(10)]
    del rows[4]["b"]
    _jsonl(tmp_path / "rows.jsonl", rows)
    (task,) = load_task_file(_task_file(tmp_path))
    with pytest.raises(GlotkitError) as err:
        task.load(tmp_path)
    _one_line(err, "rows.jsonl", "line 5", "no field 'b'")


def test_shots_pool_larger_than_the_file_says_so(tmp_path):
    _jsonl(tmp_path / "rows.jsonl", [{"a": "x", "b": "y", "scor": i} for i in range(6)])
    (task,) = load_task_file(_task_file(tmp_path, data="{file: rows.jsonl, shots_pool: 6}"))
    with pytest.raises(GlotkitError) as err:
        task.load(tmp_path)
    msg = _one_line(err, "rows.jsonl", "shots_pool=6 is too large", "6 records")
    assert "empty test split" not in msg
    (task,) = load_task_file(_task_file(tmp_path, data="{file: rows.jsonl, shots_pool: 2}"))
    data = task.load(tmp_path)
    assert len(data["train"]) == 2 and len(data["test"]) == 4
    cfg = SuiteSection(tasks=["sim"], shots=[0, 3], task_files=[str(tmp_path / "tasks.yaml")])
    with pytest.raises(GlotkitError) as err:
        resolve_suite(cfg)
    _one_line(err, "task 'sim'", "k=3 is larger than the task's train split (2 examples)")
    for bad, needle in (("{file: rows.jsonl, shots_pool: lots}", "data.shots_pool: expected a whole number"),
                        ("{file: rows.jsonl, shots_pool: -1}", "data.shots_pool: expected a whole number"),
                        ("{file: rows.jsonl, shot_pool: 2}", "data: unknown key 'shot_pool'")):
        with pytest.raises(GlotkitError) as err:
            load_task_file(_task_file(tmp_path, data=bad))
        _one_line(err, "task 'sim'", needle)


def test_cli_eval_reports_a_bad_task_file_in_one_line(tmp_path, capsys):
    from glotkit.cli import main

    rows = [{"a": "x", "b": "y", "scor": i % 5} for i in range(10)]
    rows[2]["scor"] = None
    _jsonl(tmp_path / "rows.jsonl", rows)
    spec = _task_file(tmp_path)
    assert main(["eval", "--tasks", "sim", "--task-file", str(spec), "--shots", "0"]) == 2
    err = capsys.readouterr().err
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "rows.jsonl: line 3" in lines[0] and "None is not a number" in lines[0]
