"""Label HIPE-2026 pairs with a model, and measure what that costs.

:func:`predict_pairs` runs one prompt format over a list of (document, pair) items on any
generator.  With ``labels="loglik"`` (the default) the labels are chosen, never parsed: the five
valid (at, isAt) combinations are scored by log-likelihood after "Answer:" and the likeliest is
taken, so there is no parse failure by construction (an explain format first writes its
explanation freely, greedy, up to "Answer:").  With ``labels="generate"`` the whole answer is
generated greedily and parsed (for served models that cannot score options), and parse failures
are counted.
:func:`evaluate_model` does that in a fresh process for one model (+ adapter) so that its peak
resident memory is that model's alone, writes the official predictions files (one per
language, the gold documents with our labels) and scores them against gold.  Given a
``server`` (``generate.backend: openai``), the same prompts go to the served model instead, the
answers are appended as they come (a rerun continues), and memory is the server's, not
measured here.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from glotkit.errors import GlotkitError
from glotkit.generate import Generator
from glotkit.hipe.formats import PromptBuilder, decoding, explains, label_options, parse, question
from glotkit.hipe.parse import VALID_LABELS
from glotkit.logs import say

Item = tuple[dict, dict]  # (document, pair)

# pairs labelled per option-scoring call and appended together (an interrupted run keeps whole
# chunks): a fixed number, so that the prompts scored together, and so the scores, do not depend
# on the batch size or on where a run was resumed
LABEL_CHUNK = 32


def pair_key(doc: dict, pair: dict) -> tuple[str, str, str]:
    return (doc["document_id"], pair["pers_entity_id"], pair["loc_entity_id"])


@dataclass
class Settings:
    fmt: str
    max_chars: int = 1200
    label_tokens: int = 32
    explain_tokens: int = 128
    batch_size: int = 16
    labels: str = "loglik"  # "loglik": choose among the valid labels; "generate": generate and parse
    layout: str = "pair"  # the prompt's layout (glotkit.hipe.formats.question)
    # "at/isAt" -> nats added to the option scores before the choice (fit_offsets on a dev split)
    offsets: dict[str, float] | None = None

    def __post_init__(self):
        if self.labels not in LABEL_MODES:
            raise GlotkitError(f"labels: unknown mode '{self.labels}' (known: {', '.join(LABEL_MODES)})")


LABEL_MODES = ("loglik", "generate")


def predict_pairs(generator: Generator, items: Sequence[Item], s: Settings, *, partial: Path | None = None,
                  progress: bool = True, desc: str = "predict",
                  log: Callable[[str], None] = say) -> tuple[list[dict], dict]:
    """One row per item (key, language, raw answer, labels, parse outcome) and the timing:
    greedy answers (our own loop: finished rows leave the batch) to each pair's prompt, parsed.
    With ``partial`` each answer is appended there as it comes and answers already there are
    kept (the timing then covers this run's pairs alone)."""
    from glotkit.io import append_rows, read_appended

    builder = PromptBuilder(generator.tokenizer)
    dec = decoding(s.fmt, s.label_tokens, s.explain_tokens)
    done = read_appended(partial, lambda r: tuple(r["key"])) if partial is not None else {}
    todo = [(d, p) for d, p in items if pair_key(d, p) not in done]
    if done and todo:
        log(f"{desc}: {len(items) - len(todo)} of {len(items)} answers already written, continuing")
    questions = [question(d, p, s.fmt, s.max_chars, s.layout) for d, p in todo]
    prompts = [builder.prompt_ids(q, s.fmt) for q in questions]
    rows: dict[tuple, dict] = dict(done)
    t0 = time.perf_counter()
    produced = 0
    with (partial.open("a", encoding="utf-8") if partial is not None else contextlib.nullcontext()) as fh:
        def keep_rows(new: list[dict]) -> None:
            rows.update((tuple(r["key"]), r) for r in new)
            if fh is not None:
                append_rows(fh, new)

        if todo and s.labels == "generate":
            produced = generator.sample(
                prompts, max_new_tokens=dec.max_new_tokens, batch_size=s.batch_size, temperature=0.0, stop=dec.stop,
                keep_stop=True, progress=progress, desc=desc,
                on_batch=lambda idx, texts: keep_rows([answer_row(*todo[i], s.fmt, t) for i, t in zip(idx, texts)])
            ).new_tokens
        elif todo:
            explanations = [""] * len(todo)
            if explains(s.fmt):  # the explanation is free text, up to where the labels begin
                gen = generator.sample(prompts, max_new_tokens=s.explain_tokens, batch_size=s.batch_size,
                                       temperature=0.0, stop=("Answer:",), keep_stop=False, progress=progress,
                                       desc=f"{desc} (explanations)")
                produced = gen.new_tokens
                explanations = [" ".join(t.split()) for t in gen.texts]
                prompts = [builder.prompt_ids(q, s.fmt, after_cue=f" {e}\nAnswer:")
                           for q, e in zip(questions, explanations)]
            from tqdm.auto import tqdm

            chunk = LABEL_CHUNK  # appended chunk by chunk, so an interrupted run keeps its answers
            with tqdm(total=len(todo), desc=f"{desc} (labels)", unit="pair", disable=not progress,
                      dynamic_ncols=True) as bar:
                for start in range(0, len(todo), chunk):
                    part = range(start, min(len(todo), start + chunk))
                    scores = generator.option_logliks([prompts[i] for i in part], label_options(s.fmt),
                                                      batch_size=s.batch_size, progress=False, desc=desc)
                    keep_rows([chosen_row(*todo[i], s.fmt, sc, explanations[i], s.offsets)
                               for i, sc in zip(part, scores)])
                    bar.update(len(part))
    seconds = time.perf_counter() - t0
    timing = {"pairs": len(todo), "seconds": round(seconds, 2), "new_tokens": produced,
              "prompt_tokens": sum(map(len, prompts))}
    if partial is not None:
        timing["resumed_pairs"] = len(items) - len(todo)
    timing["pairs_per_s"] = round(len(todo) / seconds, 3) if seconds and todo else None
    return [rows[pair_key(d, p)] for d, p in items], timing


def choose_labels(scores: Sequence[float]) -> tuple[str, str]:
    """The valid (at, isAt) combination with the highest log-likelihood (ties: the first)."""
    best = max(range(len(VALID_LABELS)), key=lambda i: (scores[i], -i))
    return VALID_LABELS[best]


def with_offsets(rows: Sequence[dict], offsets: dict[str, float]) -> list[dict]:
    """Rows labelled by log-likelihood, relabelled with ``offsets`` ("at/isAt" -> nats) added to
    their option scores (the labels of rows without scores are kept)."""
    out = []
    for r in rows:
        if not r.get("logliks"):
            out.append(r)
            continue
        at, is_at = choose_labels(_shifted([r["logliks"][f"{a}/{i}"] for a, i in VALID_LABELS], offsets))
        out.append(dict(r, at=at, isAt=is_at))
    return out


def _shifted(scores: Sequence[float], offsets: dict[str, float] | None) -> list[float]:
    """The option scores (in VALID_LABELS order) with each option's offset added."""
    return [x + (offsets or {}).get(f"{a}/{i}", 0.0) for (a, i), x in zip(VALID_LABELS, scores)]


def fit_offsets(rows: Sequence[dict], gold_by_language: dict[str, list[dict]], *, span: float = 8.0,
                step: float = 0.25, rounds: int = 3) -> tuple[dict[str, float], float, float]:
    """Per-option offsets added to the log-likelihoods that maximise the official profile score
    of ``rows`` (labelled by log-likelihood) against gold: a model tuned on imbalanced labels
    scores the common one too high, and macro recall rewards the rare ones (calibration of the
    decision, as thresholds are tuned on a dev split; fit it on dev, never on test).  Coordinate
    ascent over a grid (-span..span by step), FALSE/FALSE fixed at 0; among equal scores the
    offset nearest 0 wins.  Returns (offsets, score before, score after)."""
    def score(off: dict[str, float]) -> float:
        return score_rows(gold_by_language, with_offsets(rows, off), resamples=0)["profile"]["score"]

    names = [f"{a}/{i}" for a, i in VALID_LABELS if (a, i) != ("FALSE", "FALSE")]
    offsets = {n: 0.0 for n in names}
    before = best = score(offsets)
    grid = sorted((k * step for k in range(-int(span / step), int(span / step) + 1)), key=abs)
    for _ in range(rounds):
        moved = False
        for n in names:
            for v in grid:
                trial = score(offsets | {n: v})
                if trial > best + 1e-12:
                    best, offsets, moved = trial, offsets | {n: v}, True
        if not moved:
            break
    return offsets, before, best


def chosen_labels(scores: Sequence[float], offsets: dict[str, float] | None = None) -> dict:
    """``at``, ``isAt`` (the likeliest valid combination, after ``offsets`` where given) and every
    option's own score, as answer rows hold them."""
    at, is_at = choose_labels(_shifted(scores, offsets))
    return {"at": at, "isAt": is_at,
            "logliks": {f"{a}/{i}": round(float(x), 4) for (a, i), x in zip(VALID_LABELS, scores)}}


def chosen_row(doc: dict, pair: dict, fmt: str, scores: Sequence[float], explanation: str = "",
               offsets: dict[str, float] | None = None) -> dict:
    """A pair labelled by log-likelihood: the likeliest valid labels (after ``offsets``), with
    every option's score."""
    from glotkit.hipe.formats import labels_text

    chosen = chosen_labels(scores, offsets)
    raw = (f" {explanation}\nAnswer: " if explains(fmt) else " ") + labels_text(chosen["at"], chosen["isAt"], fmt)
    return {"key": list(pair_key(doc, pair)), "language": doc.get("language"), "raw": raw, "at": chosen["at"],
            "isAt": chosen["isAt"], "parsed": True, "corrected": False, "error": None, "logliks": chosen["logliks"]}


def answer_row(doc: dict, pair: dict, fmt: str, text: str) -> dict:
    """A model's answer for one pair, parsed."""
    r = parse(fmt, text)
    return {"key": list(pair_key(doc, pair)), "language": doc.get("language"), "raw": text, "at": r.at,
            "isAt": r.isAt, "parsed": r.ok, "corrected": r.corrected, "error": r.error}


def score_rows(gold_by_language: dict[str, list[dict]], rows: Sequence[dict], resamples: int = 1000) -> dict:
    """Per-language official scores of the rows' labels (each language's file on the targets of
    its data set), the profile, their bootstrap 95 % intervals over documents (``ci``; seeded)
    and parse failures."""
    from glotkit.hipe.data import predictions_docs
    from glotkit.hipe.score import bootstrap_intervals, profile, score_file

    labels = {tuple(r["key"]): (r["at"], r["isAt"]) for r in rows}
    preds = {lang: predictions_docs(docs, labels) for lang, docs in gold_by_language.items()}
    per = {lang: score_file(docs, preds[lang], where=f"predictions ({lang})")
           for lang, docs in sorted(gold_by_language.items())}
    prof = profile(per)
    if resamples:
        ci = bootstrap_intervals(gold_by_language, preds, {k: v["targets"] for k, v in per.items()}, resamples=resamples)
        for lang, r in per.items():
            r["ci"] = ci["files"].get(lang)
        prof["ci"] = ci["profile"] | {k: ci[k] for k in ("level", "resamples", "seed")}
    fails = sum(not r["parsed"] for r in rows)
    return {"languages": per, "profile": prof, "pairs": len(rows), "parse_failures": fails,
            "parse_failure_rate": round(fails / len(rows), 4) if rows else 0.0,
            "corrected": sum(bool(r["corrected"]) for r in rows)}


def model_size(model_path: str, adapter: str | None) -> dict:
    """Parameters (from the config, on the meta device; plus the adapter's) and size on disk of
    the weight files a user ships: the model folder's safetensors and the adapter's."""
    from glotkit.eval.memory import estimate_before_loading

    est = estimate_before_loading(model_path)
    params = est.linear_params + est.other_params
    disk = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    adapter_params = 0
    if adapter:
        from safetensors import safe_open

        f = Path(adapter) / "adapter_model.safetensors"
        disk += f.stat().st_size
        with safe_open(str(f), "pt") as st:
            adapter_params = sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())
    return {"params": params + adapter_params, "adapter_params": adapter_params,
            "disk_mb": round(disk / 2**20, 1), "vocab_size": est.vocab_size}


def _prod(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def _worker(job: dict) -> dict:
    """In a fresh process: load the model, label the items, write predictions, score."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from glotkit.runtime import quiet_libraries

    quiet_libraries()
    import torch

    from glotkit.config import ModelSection
    from glotkit.generate.local import LocalGenerator
    from glotkit.hipe.data import read_hipe
    from glotkit.models.loading import load_model
    from glotkit.models.memory import current_rss_mb, peak_rss_mb, reset_peak

    torch.manual_seed(0)
    log = say
    docs = read_hipe(job["items"], schema=None)
    items = [(d, p) for d in docs for p in d["sampled_pairs"]]
    baseline = current_rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    model, tok, device = load_model(ModelSection(**job["model"]), log=log)
    if job.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["adapter"])
    load_s = time.perf_counter() - t0
    rows, timing = predict_pairs(LocalGenerator(model, tok, device), items, Settings(**job["settings"]),
                                 progress=job.get("progress", True), desc=job.get("label", "predict"))
    peak = peak_rss_mb()
    return _write_and_score(job, docs, rows) | {
        "timing": timing | {"load_s": round(load_s, 2)},
        "memory": {"peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
                   "above_baseline_mb": round(peak - baseline, 1)}}


def _write_and_score(job: dict, docs: Sequence[dict], rows: Sequence[dict]) -> dict:
    """``answers.jsonl`` and the official predictions files (one per language) in ``job['out']``;
    the scores against gold."""
    from glotkit.hipe.data import write_predictions
    from glotkit.io import atomic_write_jsonl

    out = Path(job["out"])
    atomic_write_jsonl(out / "answers.jsonl", rows)
    labels = {tuple(r["key"]): (r["at"], r["isAt"]) for r in rows}
    by_lang: dict[str, list[dict]] = {}
    for d in docs:
        by_lang.setdefault(d.get("language") or "xx", []).append(d)
    for lang, ds in by_lang.items():
        write_predictions(out / f"predictions-{lang}.jsonl", ds, labels)
    return score_rows(by_lang, rows) | {"label": job.get("label"), "model": job["model"]["name"],
                                        "adapter": job.get("adapter"), "settings": job["settings"]}


def _served(job: dict, server, log: Callable[[str], None]) -> dict:
    """The job's pairs labelled by ``server``'s model; the tokenizer of ``job['model']`` builds
    the prompts."""
    from glotkit.config import ModelSection
    from glotkit.hipe.data import read_hipe
    from glotkit.models.loading import tokenizer_for

    server.tokenizer = tokenizer_for(ModelSection(**job["model"]), log=log)  # this model's prompts
    docs = read_hipe(job["items"], schema=None)
    items = [(d, p) for d in docs for p in d["sampled_pairs"]]
    partial = Path(job["out"]) / "answers.partial.jsonl"
    rows, timing = predict_pairs(server, items, Settings(**job["settings"]), partial=partial,
                                 progress=job.get("progress", True), desc=job.get("label", "predict"), log=log)
    return _write_and_score(job, docs, rows) | {"timing": timing, "memory": {"peak_rss_mb": None, "served": True}}


def _made_with(settings: Settings, adapter: str | None, items_file: Path) -> dict:
    """What an evaluation's answers depend on (the batch size does not change them), kept in its
    result.json: a result made otherwise is not reused."""
    return {k: v for k, v in asdict(settings).items() if k != "batch_size"} | {
        "adapter": "/".join(Path(adapter).parts[-2:]) if adapter else None, "items": Path(items_file).name}


def evaluate_model(label: str, model: dict, adapter: str | None, items_file: Path, settings: Settings,
                   out_dir: Path, *, progress: bool = True, log: Callable[[str], None] = say,
                   in_process: bool = False, server=None) -> dict:
    """Label ``items_file``'s pairs with one model in a fresh process (or on ``server``, a
    :class:`~glotkit.generate.server.ServerGenerator` serving this model and adapter, or a
    function that connects one when the result is not there yet);
    ``out_dir/result.json`` holds the scores, timing, peak memory and size (an existing one made
    on the same backend with the same settings, adapter and items is returned as it is; one made
    with other settings, e.g. before the decision was calibrated, is labelled again)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from glotkit.io import atomic_write_json
    from glotkit.models.loading import resolve_model_path

    done = out_dir / "result.json"
    kind = "openai" if server is not None else "local"
    made_with = _made_with(settings, adapter, items_file)
    if done.is_file():
        before = json.loads(done.read_text(encoding="utf-8"))
        changed = [k for k in made_with if k in before.get("made_with", {}) and before["made_with"][k] != made_with[k]]
        if changed:  # e.g. calibration offsets fit since: the old answers are not these settings' answers
            k = changed[0]
            log(f"{label}: labelled before with {k} = {before['made_with'][k]!r}, now {made_with[k]!r}: labelling again")
            (out_dir / "answers.partial.jsonl").unlink(missing_ok=True)
        elif before.get("backend", "local").split()[0] == kind:  # the server may have moved
            return before
        else:
            log(f"{label}: labelled before on {before.get('backend', 'local')}, now asked on {kind}: "
                "labelling again")
    if callable(server):  # connected only when something is left to ask
        server = server()
    backend = server.backend if server is not None else "local"
    path = resolve_model_path(model["name"], log=log)
    job = {"label": label, "model": dict(model, name=path), "adapter": adapter, "items": str(items_file),
           "settings": asdict(settings), "out": str(out_dir), "progress": progress}
    out_dir.mkdir(parents=True, exist_ok=True)
    if server is not None:
        result = _served(job, server, log)
    elif in_process:
        result = _worker(job)
    else:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            try:
                result = pool.submit(_worker, job).result()
            except GlotkitError:
                raise
            except Exception as err:  # the child died or raised something unexpected
                raise GlotkitError(f"evaluation of '{label}' failed in its worker process: "
                                   f"{type(err).__name__}: {err}") from None
    result["model"] = model["name"]
    result["backend"] = backend
    result["made_with"] = made_with
    result["size"] = model_size(path, adapter)
    atomic_write_json(done, result)
    (out_dir / "answers.partial.jsonl").unlink(missing_ok=True)  # served answers, now in answers.jsonl
    p = result["profile"]
    memory = (f"peak RSS {result['memory']['peak_rss_mb']:.0f} MB" if result["memory"]["peak_rss_mb"] is not None
              else f"served by {server.url}")
    log(f"{label}: score {p['score']:.4f} (binary {p['binary_score']:.4f}), "
        + ", ".join(f"{k} {v['score']:.4f}" for k, v in result["languages"].items())
        + f"; parse failures {result['parse_failures']}/{result['pairs']}; "
        f"{result['timing']['pairs_per_s']} pairs/s; {memory}")
    return result
