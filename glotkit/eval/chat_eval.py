"""Evaluate a chat model on held-out conversations: the loss per assistant token (every assistant
turn, teacher-forced) and greedy answers to each conversation's last user turn, scored against
the reference answer with language-aware EM/F1 and ROUGE-L.  Answers are appended as each batch
ends, so an interrupted evaluation continues where it stopped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from glotkit.data.chat import ChatEncoder, Conversation
from glotkit.data.prompts import EncodeStats
from glotkit.eval.qa_metrics import QAScore, aggregate, score_one
from glotkit.generate import Generator
from glotkit.generate.session import stopping_at_turn_end
from glotkit.io import append_rows, atomic_write_json, atomic_write_jsonl, read_appended
from glotkit.logs import say

PARTIAL = "predictions.partial.jsonl"


def heldout_loss(model, enc: ChatEncoder, convs: Sequence[Conversation], pad_id: int, max_length: int,
                 progress: bool = True, desc: str = "held-out loss") -> dict:
    """Loss per supervised (assistant) token of the conversations, one per row, and bits per byte
    of the supervised text; conversations longer than ``max_length`` are cut there."""
    from glotkit.data.chat import iter_supervised_text
    from glotkit.eval.perplexity import heldout_scores
    from glotkit.models.lm import build_rows

    stats = EncodeStats()
    examples = [e for c in convs if (e := enc.example(c, max_length, "truncate_context", stats)) is not None]
    if not examples:
        return {"nll_per_token": None, "perplexity": None, "bits_per_byte": None, "tokens": 0, "bytes": 0}
    n_bytes = sum(len(iter_supervised_text(e.input_ids, e.labels, enc.tok).encode("utf-8")) for e in examples)
    from glotkit.eval.uncertainty import ratio_interval

    # one pass per conversation: the figures and each conversation's summed loss for the interval
    r = heldout_scores(model, build_rows(examples), n_bytes, pad_id, progress=progress, desc=desc, per_row=True)
    ci = ratio_interval(r.pop("row_nll"), r.pop("row_tokens"))
    return r | {"truncated": stats.truncated, "dropped": stats.dropped, "nll_per_token_ci": ci}


def evaluate_chat(model, generator: Generator, enc: ChatEncoder, convs: Sequence[Conversation], cfg, *,
                  language: str, out_dir: Path, max_length: int, desc: str = "eval",
                  log: Callable[[str], None] = say, progress: bool = True) -> dict:
    """Write ``out_dir/predictions.jsonl`` and ``out_dir/metrics.json``; return the metrics.
    ``model`` is the local model that ``generator`` runs (the held-out loss needs it)."""
    from glotkit.eval.metrics import rouge_scores

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    convs = list(convs)
    pad_id = enc.tok.pad_token_id if enc.tok.pad_token_id is not None else enc.tok.eos_token_id
    loss = heldout_loss(model, enc, convs, pad_id, max_length, progress, f"{desc}: loss")

    partial = out_dir / PARTIAL
    done = read_appended(partial, lambda r: r["id"])
    if done:
        log(f"{desc}: resuming, {len(done)} of {len(convs)} answers already written")
    todo = [c for c in convs if c.id not in done]

    def record(c: Conversation, generation: str) -> dict:
        pred = generation.strip()
        s = score_one(pred, [c.answer()], language)
        question = c.context()[-1]["content"] if c.is_chat else c.prompt
        return {"id": c.id, "question": question, "gold": [c.answer()], "generation": generation,
                "prediction": pred, "em": s.em, "f1": round(s.f1, 4), "em_raw": s.em_raw, "f1_raw": round(s.f1_raw, 4),
                "turns": c.turns}

    t0 = time.perf_counter()
    new_tokens = 0
    if todo:
        with partial.open("a", encoding="utf-8") as fh, stopping_at_turn_end(model, enc.stop_ids(todo[0])):
            def on_batch(idx: list[int], texts: list[str]) -> None:
                rows = [record(todo[i], t) for i, t in zip(idx, texts)]
                for r in rows:
                    done[r["id"]] = r
                append_rows(fh, rows)

            new_tokens = generator.greedy([enc.prompt_ids(c) for c in todo], max_new_tokens=cfg.max_new_tokens,
                                          batch_size=cfg.batch_size, stop=None, progress=progress,
                                          desc=f"{desc}: answers", on_batch=on_batch).new_tokens
    seconds = time.perf_counter() - t0
    ordered = [done[c.id] for c in convs]
    metrics = loss | aggregate([QAScore(r["em"], r["f1"], r["em_raw"], r["f1_raw"]) for r in ordered])
    metrics["rougeL"] = rouge_scores([r["prediction"] for r in ordered], [r["gold"][0] for r in ordered])["rougeL"]
    for r in ordered:  # per conversation, for its interval
        r.setdefault("rougeL", rouge_scores([r["prediction"]], [r["gold"][0]])["rougeL"] / 100)
    from glotkit.eval.qa_eval import intervals

    metrics |= intervals(ordered, None, ("em", "f1", "rougeL"), unit="conversations")
    metrics |= {"n": len(ordered), "seconds": round(seconds, 2), "backend": generator.backend}
    if todo:
        metrics["examples_per_s"] = round(len(todo) / max(seconds, 1e-9), 2)
        metrics["generated_tokens_per_s"] = round(new_tokens / max(seconds, 1e-9), 1)
    atomic_write_jsonl(out_dir / "predictions.jsonl", ordered)
    atomic_write_json(out_dir / "metrics.json", metrics)
    partial.unlink(missing_ok=True)
    return metrics
