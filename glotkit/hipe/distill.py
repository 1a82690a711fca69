"""DistilledGemma on HIPE-2026 (``task: distill``): prompt comparison -> teacher -> traces ->
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

import contextlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Sequence

from glotkit.config import Recipe
from glotkit.errors import GlotkitError
from glotkit.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

SPLITS = ("train", "dev", "test")


# --------------------------------------------------------------------------- data


def _read(recipe: Recipe, path: str) -> list[dict]:
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


def make_splits(recipe: Recipe) -> dict[str, dict[str, list[dict]]]:
    """split -> language -> documents (with only the sampled pairs); seeded, by document."""
    from glotkit.hipe.data import split_by_document

    d = recipe.distill
    if not d.data:
        raise GlotkitError("distill.data: no gold HIPE-2026 files given")
    docs = [doc for f in d.data for doc in _read(recipe, f)]
    seen: set[str] = set()
    for doc in docs:
        if doc["document_id"] in seen:
            raise GlotkitError(f"distill.data: document id '{doc['document_id']}' appears twice")
        seen.add(doc["document_id"])
    splits: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
    limits = {"train": d.train_pairs, "dev": d.dev_pairs, "test": d.test_pairs}
    for lang, ds in sorted(_by_language(docs, "distill.data").items()):
        rest, test = split_by_document(ds, d.test_ratio, recipe.seed)
        if d.dev_ratio > 0:
            train, dev = split_by_document(rest, min(0.9, d.dev_ratio / (1 - d.test_ratio)), recipe.seed + 1)
        else:
            train, dev = rest, []
        for name, part in (("train", train), ("dev", dev), ("test", test)):
            splits[name][lang] = _sample_pairs(part, limits[name], recipe.seed)
        if not splits["train"][lang] or not splits["test"][lang]:
            raise GlotkitError(f"distill.data: language '{lang}' has too few documents ({len(ds)}) for a train and "
                               "a test split")
    return splits


def _silver(recipe: Recipe, gold_ids: set[str]) -> dict[str, list[dict]]:
    d = recipe.distill
    if not d.silver or not d.silver_pairs:
        return {}
    docs = [doc for f in d.silver for doc in _read(recipe, f) if doc["document_id"] not in gold_ids]
    return {lang: _sample_pairs(ds, d.silver_pairs, recipe.seed + 2)
            for lang, ds in sorted(_by_language(docs, "distill.silver").items())}


def items_of(docs_by_lang: dict[str, list[dict]]) -> list[tuple[dict, dict]]:
    return [(doc, p) for lang in sorted(docs_by_lang) for doc in docs_by_lang[lang] for p in doc["sampled_pairs"]]


def training_items(splits) -> list[tuple[dict, dict]]:
    """The pairs the teacher learns and explains: the gold train split, then the silver pairs."""
    return items_of(splits["train"]) + items_of(splits.get("silver", {}))


def _counts(by_lang: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    return {lang: {"documents": len(ds), "pairs": sum(len(x["sampled_pairs"]) for x in ds)} for lang, ds in by_lang.items()}


def _write_splits(recipe: Recipe, run_dir: Path, splits) -> dict[str, dict[str, dict[str, int]]]:
    """Write each split's documents (and the silver ones, added to ``splits``); return the counts."""
    folder = run_dir / "split"
    gold_ids = {doc["document_id"] for by_lang in splits.values() for ds in by_lang.values() for doc in ds}
    silver = _silver(recipe, gold_ids)
    if silver:
        splits["silver"] = silver
    summary = {}
    for name, by_lang in splits.items():
        atomic_write_jsonl(folder / f"{name}.jsonl", [doc for lang in sorted(by_lang) for doc in by_lang[lang]])
        summary[name] = _counts(by_lang)
    atomic_write_json(folder / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- checks


def _settings(recipe: Recipe, fmt: str):
    from glotkit.hipe.predict import Settings

    d = recipe.distill
    return Settings(fmt=fmt, max_chars=d.max_chars, label_tokens=d.label_tokens, explain_tokens=d.explain_tokens,
                    batch_size=d.batch_size)


def check_inputs(recipe: Recipe, log: Callable[[str], None] = print) -> dict:
    """Fail on bad input before any model is loaded: the data (schema, empty mentions), the
    students (names, vocabularies for logit-level distillation), and warn about a student that
    is larger than its teacher.  Returns the splits (:func:`make_splits`)."""
    from glotkit.eval.memory import estimate_before_loading

    splits = make_splits(recipe)
    d = recipe.distill
    names = [s.name for s in d.students]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GlotkitError(f"distill.students: the name '{dup[0]}' is used twice")
    stages = set(recipe.stages)
    if not stages & {"student", "evaluate"} or not d.students:
        return splits
    teacher = estimate_before_loading(recipe.model.name)
    t_params = teacher.linear_params + teacher.other_params
    for st in d.students:
        if st.trim_vocab and st.model != recipe.model.name:
            log(f"[glotkit] note: student '{st.name}': trim_vocab trims '{st.model}', not the teacher's base")
        est = estimate_before_loading(st.model)
        params = est.linear_params + est.other_params
        if params > t_params and not st.trim_vocab:
            log(f"[glotkit] warning: student '{st.name}' ({params:,} parameters) is larger than the teacher "
                f"'{recipe.model.name}' ({t_params:,}); distillation usually goes to a smaller model")
        if d.level == "logits":
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
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if "/" in name else name).strip("_") or "model"


def run_distill(recipe: Recipe, run_dir: Path, log: Callable[[str], None] = print, progress: bool = True,
                splits: dict | None = None) -> None:
    """Run the stages of a distill recipe; the caller has run :func:`check_inputs` (whose splits
    it may pass on, so the gold files are read once)."""
    stages = set(recipe.stages)
    if splits is None:
        splits = make_splits(recipe)
    summary = _write_splits(recipe, run_dir, splits)
    for name in ("train", "dev", "test"):
        log(f"[glotkit] {name}: " + ", ".join(f"{k} {v['documents']} documents / {v['pairs']} pairs"
                                               for k, v in sorted(summary[name].items())))
    if "compare" in stages:
        run_compare(recipe, run_dir, log, progress)
    if "teacher" in stages:
        train_teacher(recipe, run_dir, splits, log, progress)
    if "traces" in stages:
        write_traces(recipe, run_dir, splits, log, progress)
    if "student" in stages:
        for st in recipe.distill.students:
            train_student(recipe, run_dir, st, splits, log, progress)
    if "evaluate" in stages:
        run_evaluate(recipe, run_dir, log, progress)
    if "report" in stages:
        from glotkit.report import write_distill_report

        log(f"[glotkit] report: {write_distill_report(run_dir, recipe)}")


def run_compare(recipe: Recipe, run_dir: Path, log, progress) -> list[dict]:
    """Every compared model × prompt format on the dev split, then ``compare/table.md``."""
    from glotkit.hipe.predict import evaluate_model

    d = recipe.distill
    dev = run_dir / "split" / "dev.jsonl"
    if not d.dev_ratio or not dev.is_file() or not dev.read_text().strip():
        raise GlotkitError("distill.dev_ratio: the prompt comparison needs a dev split (dev_ratio > 0)")
    rows = []
    for model in d.compare_models:
        server = _connector(recipe, recipe.compare_role(model), log, "compare")
        for fmt in d.compare_formats:
            r = evaluate_model(f"{model} / {fmt}", {"name": model}, None, dev, _settings(recipe, fmt),
                               run_dir / "compare" / f"{model_slug(model)}--{fmt}", progress=progress, log=log,
                               server=server)
            rows.append(r | {"format": fmt})
    atomic_write_text(run_dir / "compare" / "table.md", compare_table(rows))
    return rows


def compare_table(rows: Sequence[dict]) -> str:
    langs = sorted({lang for r in rows for lang in r["languages"]})
    head = ["model", "format", "score", "binary", *langs, "parse failures", "s / pair"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        t = r["timing"]
        out.append(f"| {r['model']} | {r['format']} | {r['profile']['score'] * 100:.2f} | "
                   f"{r['profile']['binary_score'] * 100:.2f} | "
                   + " | ".join(f"{r['languages'][x]['score'] * 100:.2f}" if x in r["languages"] else "–" for x in langs)
                   + f" | {r['parse_failure_rate'] * 100:.1f} % | {t['seconds'] / max(1, t['pairs']):.2f} |")
    return "\n".join(out) + "\n"


def best_format(run_dir: Path, model: str, default: str) -> str:
    """The format that scored best for ``model`` in the comparison (ties: fewer parse failures,
    then faster); ``default`` when the model was not compared."""
    found = []
    for f in sorted((run_dir / "compare").glob(f"{model_slug(model)}--*/result.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        fmt = f.parent.name.split("--", 1)[1]
        found.append((-r["profile"]["score"], r["parse_failure_rate"], r["timing"]["seconds"], fmt))
    return min(found)[3] if found else default


def _train_adapter(recipe: Recipe, model_cfg, examples, out: Path, work: Path, what: str, log, progress,
                   epochs: float | None = None, lr: float | None = None) -> None:
    import torch

    from glotkit.models.loading import load_model
    from glotkit.models.lora import apply_lora
    from glotkit.train.engine import train_adapter

    cfg = recipe.train.model_copy(update={k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None})
    torch.manual_seed(recipe.seed)
    model, tok, device = load_model(model_cfg, log=log)
    fitting = [e for e in examples if len(e.input_ids) <= cfg.max_length]
    if len(fitting) < len(examples):
        log(f"[glotkit] warning: {what}: {len(examples) - len(fitting)} of {len(examples)} examples longer than "
            f"train.max_length={cfg.max_length} were dropped")
    if not fitting:
        raise GlotkitError(f"{what}: no example fits train.max_length={cfg.max_length}")
    train_adapter(apply_lora(model, recipe.lora), fitting, cfg, what=what, out=out, work_dir=work, seed=recipe.seed,
                  pad_id=tok.pad_token_id, device=device, log=log, progress=progress,
                  info={"dropped_too_long": len(examples) - len(fitting), "epochs": cfg.epochs, "lr": cfg.lr})


def _tokenizer(name: str):
    from glotkit.config import ModelSection
    from glotkit.models.loading import tokenizer_for

    return tokenizer_for(ModelSection(name=name), log=lambda m: None)


def train_teacher(recipe: Recipe, run_dir: Path, splits, log, progress) -> None:
    """LoRA (QLoRA with model.quantization: nf4) on the gold train labels in ``teacher_format``."""
    from glotkit.hipe.formats import PromptBuilder, question, response

    out = run_dir / "teacher" / "adapter"
    if (out / "adapter_config.json").is_file():
        log("[glotkit] teacher: trained before, kept")
        return
    d = recipe.distill
    builder = PromptBuilder(_tokenizer(recipe.model.name))
    items = training_items(splits)
    examples = [builder.example(question(doc, p, d.teacher_format, d.max_chars), d.teacher_format,
                                response(d.teacher_format, p["at"], p["isAt"]), group=doc["document_id"])
                for doc, p in items]
    _train_adapter(recipe, recipe.model, examples, out, run_dir / "teacher" / "train", "teacher", log, progress)


def _key(doc: dict, pair: dict) -> str:
    return "\t".join((doc["document_id"], pair["pers_entity_id"], pair["loc_entity_id"]))


def write_traces(recipe: Recipe, run_dir: Path, splits, log, progress, model=None, tok=None, device="cpu") -> dict:
    """The teacher explains every training pair's gold label (rationalization: the label is in the
    answer, and the explanation starts with the person's name; ``distill.explain_with: base``
    writes the explanations with the adapter switched off), then the tuned teacher answers again
    after the explanation with the label left out of the prompt; a trace is kept when that answer
    equals gold.  Both steps append to JSONL files batch by batch, so an interrupted run
    continues where it stopped."""
    from glotkit.hipe.formats import PromptBuilder, decoding, explanation_of, parse, question, rationalization
    from glotkit.io import read_appended

    folder = run_dir / "traces"
    if (folder / "summary.json").is_file():
        log("[glotkit] traces: written before, kept")
        return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    d = recipe.distill
    fmt = d.student_format
    items = training_items(splits)
    silver_ids = {doc["document_id"] for ds in splits.get("silver", {}).values() for doc in ds}
    servers = _trace_servers(recipe, log)
    if servers:  # the server generates: the tokenizer is enough
        from glotkit.models.loading import tokenizer_for

        tok = tokenizer_for(recipe.model, log=log)
    elif model is None:
        from peft import PeftModel

        from glotkit.models.loading import load_model

        adapter = run_dir / "teacher" / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise GlotkitError(f"{adapter}: no teacher adapter; add 'teacher' to stages")
        model, tok, device = load_model(recipe.model, log=log)
        model = PeftModel.from_pretrained(model, str(adapter))
    folder.mkdir(parents=True, exist_ok=True)
    builder = PromptBuilder(tok)
    gen = dict(batch_size=d.batch_size, device=device, progress=progress)

    # 1. explanations of the gold labels
    path = folder / "explanations.jsonl"
    done = read_appended(path, lambda r: r["key"])
    todo = [(doc, p) for doc, p in items if _key(doc, p) not in done]
    if done and todo:
        log(f"[glotkit] traces: {len(done)} explanations already written, continuing")
    asks = [rationalization(doc, p, fmt, d.max_chars) for doc, p in todo]
    base_off = todo and d.explain_with == "base" and not servers
    with (model.disable_adapter() if base_off else contextlib.nullcontext()):
        s1, n1 = _generate_appending(
            model, tok, path, [builder.prompt_ids(user, fmt, turn=turn) for user, turn, _ in asks],
            lambda i, t: {"key": _key(*todo[i]), "raw": t,
                          "explanation": explanation_of(asks[i][2] + t) if _usable(t) else ""},
            max_new_tokens=d.explain_tokens, stop=("\n", "Answer:"), desc="teacher explains",
            server=servers.get(d.explain_with), **gen)
    explained = read_appended(path, lambda r: r["key"])

    # 2. the teacher's own answer after its explanation, without the gold label
    path2 = folder / "checked.jsonl"
    done2 = read_appended(path2, lambda r: r["key"])
    usable = [(doc, p) for doc, p in items if _usable(explained[_key(doc, p)]["explanation"])]
    todo2 = [(doc, p) for doc, p in usable if _key(doc, p) not in done2]

    def checked_row(i: int, text: str) -> dict:
        r = parse(fmt, "Answer:" + text)
        return {"key": _key(*todo2[i]), "raw": text, "at": r.at, "isAt": r.isAt, "parsed": r.ok}

    s2, n2 = _generate_appending(
        model, tok, path2, [builder.prompt_ids(question(doc, p, fmt, d.max_chars), fmt,
                                               after_cue=" " + explained[_key(doc, p)]["explanation"] + "\nAnswer:")
                            for doc, p in todo2],
        checked_row, max_new_tokens=d.label_tokens, stop=decoding(fmt, d.label_tokens, d.explain_tokens).stop,
        keep_stop=True, desc="teacher checks", server=servers.get("teacher"), **gen)
    seconds, produced = s1 + s2, n1 + n2
    checked = read_appended(path2, lambda r: r["key"])

    traces, counts = [], {}
    for doc, p in items:
        k = _key(doc, p)
        e, c = explained[k], checked.get(k)
        reason = ("no usable explanation" if not _usable(e["explanation"]) else
                  "answer not parsed" if not c["parsed"] else
                  "answer differs from gold" if (c["at"], c["isAt"]) != (p["at"], p["isAt"]) else None)
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
    atomic_write_jsonl(folder / "traces.jsonl", traces)
    summary = {"written": len(items), "kept": len(traces), "counts": counts, "seconds": round(seconds, 1),
               "new_tokens": produced, "tokens_per_s": round(produced / seconds, 1) if seconds else None,
               "format": fmt}
    atomic_write_json(folder / "summary.json", summary)
    log(f"[glotkit] traces: kept {len(traces)} of {len(items)} ("
        + ", ".join(f"{k} {v['kept']}/{v['written']}" for k, v in sorted(counts.items())) + ")")
    return summary


def _server(recipe: Recipe, role: str, log, what: str, optional: bool = False):
    """The ServerGenerator of ``role`` with ``generate.backend: openai`` (checked to be served),
    else None; None too for an ``optional`` role without a served name."""
    connect = _connector(recipe, role, log, what, optional)
    return connect() if connect else None


def _connector(recipe: Recipe, role: str, log, what: str, optional: bool = False):
    """A function that connects (once) to the server of ``role``, for stages that connect only
    when something is left to ask; None where ``role`` answers locally."""
    if recipe.generate.backend != "openai":
        return None
    if optional and role not in recipe.generate.models:
        log(f"[glotkit] {what}: no generate.models.{role}: that model answers locally")
        return None
    from functools import cache

    from glotkit.generate.server import ServerGenerator

    return cache(lambda: ServerGenerator.connect(recipe.generate, role, log, what))


def _trace_servers(recipe: Recipe, log) -> dict:
    """role -> ServerGenerator for the trace steps with ``generate.backend: openai`` (else empty)."""
    if recipe.generate.backend != "openai":
        return {}
    return {r: _server(recipe, r, log, "traces") for r in sorted({"teacher", recipe.distill.explain_with})}


def _generate_appending(model, tok, path: Path, prompts, row: Callable[[int, str], dict], server=None,
                        **gen) -> tuple[float, int]:
    """Greedy generation for ``prompts`` (locally, or on ``server`` with the same prompts as
    text), each batch's ``row(index, text)`` appended (fsynced) to ``path`` as it ends; returns
    (seconds, new tokens)."""
    import time

    from glotkit.generate.local import generate_sampled
    from glotkit.io import append_rows

    if not prompts:
        return 0.0, 0
    with path.open("a", encoding="utf-8") as fh:
        t0 = time.perf_counter()
        write = lambda idx, texts: append_rows(fh, [row(i, t) for i, t in zip(idx, texts)])  # noqa: E731
        if server is not None:
            from glotkit.generate.server import prompt_text

            for local_only in ("batch_size", "device"):
                gen.pop(local_only, None)
            _, n = server.generate([prompt_text(tok, p) for p in prompts], temperature=0.0, on_batch=write, **gen)
        else:
            _, n = generate_sampled(model, tok, prompts, temperature=0.0, on_batch=write, **gen)
    return time.perf_counter() - t0, n


def _usable(text: str) -> bool:
    """An explanation worth learning from: a few words of the model's own, not a label dump."""
    return len(text.split()) >= 3 and "{" not in text


def train_student(recipe: Recipe, run_dir: Path, st, splits, log, progress) -> None:
    """SFT of one student on the kept traces (response-level: the teacher's text, any vocabulary)."""
    from glotkit.hipe.formats import PromptBuilder, question, response

    folder = run_dir / "students" / st.name
    out = folder / "adapter"
    if (out / "adapter_config.json").is_file():
        log(f"[glotkit] student '{st.name}': trained before, kept")
        return
    d = recipe.distill
    traces_path = run_dir / "traces" / "traces.jsonl"
    if not traces_path.is_file():
        raise GlotkitError(f"{traces_path}: no traces; add 'traces' to stages")
    from glotkit.io import read_jsonl

    traces = read_jsonl(traces_path)
    if not traces:
        raise GlotkitError(f"{traces_path}: the teacher kept no trace, so there is nothing to distill")
    if d.level == "logits":
        check_logit_level(recipe.model.name, st.model, st.name, trimmed=st.trim_vocab)
    by_key = {_key(doc, p): (doc, p) for doc, p in training_items(splits)}
    model_name = student_model_path(recipe, run_dir, st, splits, traces, log)
    builder = PromptBuilder(_tokenizer(model_name))
    examples = []
    for t in traces:
        doc, p = by_key[t["key"]]
        examples.append(builder.example(question(doc, p, d.student_format, d.max_chars), d.student_format,
                                        response(d.student_format, t["at"], t["isAt"], t["explanation"]),
                                        group=doc["document_id"]))
    cfg = recipe.model.model_copy(update={"name": model_name, "quantization": "none"})
    _train_adapter(recipe, cfg, examples, out, folder / "train", f"student '{st.name}'", log, progress,
                   epochs=d.student_epochs, lr=d.student_lr)


def student_model_path(recipe: Recipe, run_dir: Path, st, splits, traces, log) -> str:
    """The student's base: its model, or with ``trim_vocab`` a copy keeping only the tokens of
    the training articles, the prompts and the traces (plus every BPE merge path and byte
    fallback, so any text still encodes)."""
    if not st.trim_vocab:
        return st.model
    folder = run_dir / "students" / st.name / "model"
    if (folder / "glotkit-trim.json").is_file():
        return str(folder)
    from glotkit.hipe.formats import FORMATS, question
    from glotkit.models.loading import resolve_model_path
    from glotkit.models.trim_vocab import trim_vocabulary

    items = training_items(splits)
    texts = list({doc["document_id"]: doc["text"] for doc, _ in items}.values())
    texts += [question(items[0][0], items[0][1], f, recipe.distill.max_chars) for f in FORMATS]
    texts += [t["explanation"] for t in traces]
    texts += ['{"at": "TRUE", "isAt": "FALSE"} {"at": "PROBABLE", "isAt": "TRUE"} at: FALSE isAt: TRUE Answer:']
    info = trim_vocabulary(resolve_model_path(st.model, log=log), texts, folder, log=log)
    log(f"[glotkit] student '{st.name}': vocabulary {info['vocab_before']:,} -> {info['vocab_after']:,}")
    return str(folder)


def _entries(recipe: Recipe, run_dir: Path) -> list[dict]:
    d = recipe.distill
    teacher = recipe.model.model_dump(mode="json")
    out = []
    if d.untuned:
        out.append({"label": "teacher (untuned)", "role": "untuned teacher", "model": teacher, "adapter": None,
                    "format": best_format(run_dir, recipe.model.name, d.teacher_format), "served_as": "base"})
    out.append({"label": "teacher", "role": "teacher", "model": teacher,
                "adapter": str(run_dir / "teacher" / "adapter"), "format": d.teacher_format, "served_as": "teacher"})
    for st in d.students:
        base = str(run_dir / "students" / st.name / "model") if st.trim_vocab else st.model
        if d.untuned:  # a trimmed base answers as its full base does: its row shows what trimming saves
            out.append({"label": f"{st.name} (untuned)", "role": "untuned student", "model": {"name": base},
                        "adapter": None, "format": best_format(run_dir, st.model, d.student_format),
                        "served_as": f"student.{st.name}.base"})
        out.append({"label": st.name, "role": "student", "model": {"name": base},
                    "adapter": str(run_dir / "students" / st.name / "adapter"), "format": d.student_format,
                    "served_as": f"student.{st.name}"})
    return out


def run_evaluate(recipe: Recipe, run_dir: Path, log, progress) -> dict:
    """Every model on the test split, each in its own process (or, with ``generate.backend:
    openai``, on the server of its role where the role has a served name); then the
    efficiency–accuracy table."""
    from glotkit.hipe.predict import evaluate_model

    entries = _entries(recipe, run_dir)
    for e in entries:  # everything the table needs exists before the first model is loaded
        if e["adapter"] and not (Path(e["adapter"]) / "adapter_config.json").is_file():
            raise GlotkitError(f"{e['adapter']}: no adapter for '{e['label']}'; add 'teacher' / 'student' to stages")
        name = e["model"]["name"]
        if Path(name).is_relative_to(run_dir) and not Path(name).is_dir():
            raise GlotkitError(f"{name}: no trimmed model for '{e['label']}'; add 'student' to stages")
    results = []
    for e in entries:
        r = evaluate_model(e["label"], e["model"], e["adapter"], run_dir / "split" / "test.jsonl",
                           _settings(recipe, e["format"]), run_dir / "evaluate" / model_slug(e["label"]),
                           progress=progress, log=log,
                           server=_connector(recipe, e["served_as"], log, "evaluate", optional=True))
        results.append(r | {"label": e["label"], "role": e["role"], "format": e["format"]})
    table = efficiency_table(results, recipe.distill.within_points)
    atomic_write_json(run_dir / "evaluate" / "table.json", table)
    atomic_write_text(run_dir / "evaluate" / "table.md", table["markdown"])
    for line in table["answer"]:
        log(f"[glotkit] {line}")
    return table


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
                     "parse_failure_rate": r["parse_failure_rate"],
                     "rank": {"accuracy": acc[i], "params": par[i], "size": size[i], "mean": round(mean[i], 2),
                              "overall": overall[i]}})
    head = ["model", "format", "params", "disk MB", "peak RSS MB", "pairs/s", *langs, "overall", "binary",
            "parse fail", "rank acc", "rank params", "rank size", "rank"]
    md = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "served"
        md.append(f"| {r['label']} | {r['format']} | {r['params'] / 1e6:.1f}M | {r['disk_mb']:.0f} | "
                  f"{rss} | {r['pairs_per_s']} | "
                  + " | ".join(f"{r['languages'][x] * 100:.2f}" if x in r["languages"] else "–" for x in langs)
                  + f" | **{r['score'] * 100:.2f}** | {r['binary'] * 100:.2f} | {r['parse_failure_rate'] * 100:.1f} % | "
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
