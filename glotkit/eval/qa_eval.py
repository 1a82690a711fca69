"""Evaluate a model on QA examples: generate, extract, score; resumable and written incrementally."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from glotkit.config import EvalSection
from glotkit.data.prompts import PromptFormatter
from glotkit.data.qa import QAExample
from glotkit.eval.qa_metrics import QAScore, aggregate, extract_answer, score_one
from glotkit.generate import Generator
from glotkit.io import atomic_write_json, atomic_write_jsonl
from glotkit.logs import say

PARTIAL = "predictions.partial.jsonl"
CI_UNIT = "contexts (the questions of one context are resampled together)"


def context_id(context: str) -> str:
    """A short name of a context: questions with the same one are one cluster in the bootstrap."""
    import hashlib

    return hashlib.sha1(context.encode("utf-8")).hexdigest()[:12]


def intervals(rows: list[dict], clusters: list[str] | None, keys=("em", "f1"), unit: str | None = None) -> dict:
    """95 % bootstrap intervals (×100, like the scores) of per-item scores, and the method
    (``unit``: what the items are, when they are not clustered)."""
    from glotkit.eval.uncertainty import interval, method

    out = {f"{k}_ci": interval([100 * float(r[k]) for r in rows], clusters) for k in keys}
    out["ci_method"] = method(CI_UNIT if clusters is not None else unit or "items")
    return out


def evaluate_qa(
    generator: Generator,
    fmt: PromptFormatter,
    examples: Sequence[QAExample],
    cfg: EvalSection,
    *,
    language: str,
    out_dir: Path,
    desc: str = "eval",
    log: Callable[[str], None] = say,
    progress: bool = True,
) -> dict:
    """Write ``out_dir/predictions.jsonl`` and ``out_dir/metrics.json``; return the metrics.

    Predictions are appended to a partial file after every batch, so an interrupted evaluation
    continues with the examples it has not done yet.  ``generator`` answers greedily: the local
    model, or a served one (the same prompts as text).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = list(examples)[: cfg.limit] if cfg.limit else list(examples)
    partial = out_dir / PARTIAL
    done: dict[str, dict] = {}
    if partial.is_file():
        with partial.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: it is redone
                done[rec["id"]] = rec
        if done:
            log(f"{desc}: resuming, {len(done)} of {len(examples)} predictions already written")
        # rewrite without a possibly cut last line
        with partial.open("w", encoding="utf-8") as fh:
            for rec in done.values():
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    todo = [ex for ex in examples if ex.id not in done]
    prompts = [fmt.prompt_ids(ex) for ex in todo]

    def record(ex: QAExample, generation: str) -> dict:
        pred = extract_answer(generation, fmt.cfg.answer_marker)
        s = score_one(pred, ex.answers, language)
        return {
            "id": ex.id,
            "context_id": context_id(ex.context),
            "question": ex.question,
            "gold": ex.answers,
            "generation": generation,
            "prediction": pred,
            "em": s.em,
            "f1": round(s.f1, 4),
            "em_raw": s.em_raw,
            "f1_raw": round(s.f1_raw, 4),
        }

    t0 = time.perf_counter()
    new_tokens = 0
    with partial.open("a", encoding="utf-8") as fh:

        def on_batch(idx: list[int], texts: list[str]) -> None:
            for i, t in zip(idx, texts):
                rec = record(todo[i], t)
                done[rec["id"]] = rec
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

        if todo:
            new_tokens = generator.greedy(prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                          progress=progress, desc=desc, on_batch=on_batch).new_tokens
    seconds = time.perf_counter() - t0
    ordered = [done[ex.id] for ex in examples]
    metrics = aggregate([QAScore(r["em"], r["f1"], r["em_raw"], r["f1_raw"]) for r in ordered])
    metrics |= intervals(ordered, [context_id(ex.context) for ex in examples])
    metrics["seconds"] = round(seconds, 2)
    metrics["backend"] = generator.backend
    if todo:
        metrics["examples_per_s"] = round(len(todo) / max(seconds, 1e-9), 2)
        metrics["generated_tokens_per_s"] = round(new_tokens / max(seconds, 1e-9), 1)
    atomic_write_jsonl(out_dir / "predictions.jsonl", ordered)
    atomic_write_json(out_dir / "metrics.json", metrics)
    partial.unlink(missing_ok=True)
    return metrics
