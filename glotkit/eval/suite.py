"""The Romanian task suite: small declarative tasks, zero/k-shot prompts, two scoring modes.

A :class:`Task` names its data reader, prompt template, answer verbalization, metric and
``max_new_tokens``; nothing else in the engine knows about it, so a user task is one more
``Task(...)``.  Few-shot examples are drawn from the task's train split with a recorded seed
(the same seed gives the same demonstrations, whatever the batch size).

Scoring modes:

* ``generate``: greedy generation (stop at the first newline), parsed by the task;
* ``loglik``: for classification, the summed log-likelihood of each verbalized label after the
  prompt (what lm-evaluation-harness does); small base models need it, since they rarely answer
  with a bare label.  Every result records the mode it came from.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from glotkit.errors import GlotkitError


@dataclass
class Task:
    name: str
    kind: str  # "classification" | "regression"
    description: str
    load: Callable[[Path], dict[str, list[dict]]]  # data root -> {"train": [...], "test": [...]}
    template: str  # a prompt for one record; ends where the answer starts
    answer: Callable[[dict], str]  # the gold answer as text (for demonstrations and loglik)
    labels: list[str] = field(default_factory=list)  # verbalized labels (classification)
    max_new_tokens: int = 10

    def fields(self) -> set[str]:
        return set(re.findall(r"{(\w+)}", self.template))


def _seeded_split(rows: list[dict], test_size: int, seed: int = 0) -> dict[str, list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return {"test": [rows[i] for i in order[:test_size]], "train": [rows[i] for i in order[test_size:]]}


def _need(path: Path) -> Path:
    if not path.exists():
        raise GlotkitError(f"{path}: task data not found (../shared/data, or --data-root)")
    return path


def _load_laroseda(root: Path) -> dict[str, list[dict]]:
    doc = json.loads(_need(root / "laroseda" / "laroseda_train.json").read_text(encoding="utf-8"))
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
    doc = json.loads(_need(root / "ronli" / "validation.json").read_text(encoding="utf-8"))
    rows = [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": _RONLI[int(r["label"])]} for r in doc]
    return _seeded_split(rows, 1000)


def _load_rosts(root: Path) -> dict[str, list[dict]]:
    def read(name):
        out = []
        for line in _need(root / "ro-sts" / "text-similarity" / name).read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                out.append({"score": float(parts[0]), "s1": parts[1], "s2": parts[2]})
        return out

    return {"train": read("RO-STS.train.tsv"), "test": read("RO-STS.dev.tsv")}


BUILTIN_TASKS: dict[str, Task] = {
    "sentiment": Task("sentiment", "classification", "LaRoSeDa product reviews (1–2 stars negative, 4–5 positive)",
                      _load_laroseda, "Recenzie: {text}\nRecenzia este pozitivă sau negativă? Răspuns:",
                      lambda r: r["label"], ["pozitivă", "negativă"]),
    "nli": Task("nli", "classification", "RoNLI sentence pairs, 4 relations",
                _load_ronli, "Propoziția 1: {premise}\nPropoziția 2: {hypothesis}\n"
                "Relația (contrast, implicare, consecință sau fără legătură):", lambda r: r["label"], list(_RONLI)),
    "sts": Task("sts", "regression", "RO-STS similarity 0–5",
                _load_rosts, "Propoziția 1: {s1}\nPropoziția 2: {s2}\nSimilaritate (0-5):",
                lambda r: f"{r['score']:.1f}"),
}


def get_tasks(names: Sequence[str]) -> list[Task]:
    out = []
    for n in names:
        if n not in BUILTIN_TASKS:
            raise GlotkitError(f"--tasks: unknown task '{n}' (available: {', '.join(BUILTIN_TASKS)})")
        out.append(BUILTIN_TASKS[n])
    return out


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


def build_prompt(task: Task, record: dict, shots: list[dict]) -> str:
    demos = [task.template.format(**s) + " " + task.answer(s) for s in shots]
    return "\n\n".join(demos + [task.template.format(**record)])


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label mentioned first in the generation (case-insensitive), or None."""
    low = text.casefold()
    hits = [(low.find(l.casefold()), l) for l in labels if l.casefold() in low]
    return min(hits)[1] if hits else None


def parse_number(text: str) -> float | None:
    m = re.search(r"-?\d+(?:[.,]\d+)?", text)
    return float(m.group(0).replace(",", ".")) if m else None


@torch.no_grad()
def option_logliks(model, tokenizer, prompts: Sequence[list[int]], options: Sequence[list[int]],
                   batch_size: int, device: str = "cpu") -> list[list[float]]:
    """Sum of log-probabilities of each option's tokens after each prompt (right-padded batches,
    so every sequence sits at the same positions whatever its batch)."""
    import torch.nn.functional as F

    from glotkit.train.engine import SupervisedLoss

    loss_fn = SupervisedLoss(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
    scores = [[0.0] * len(options) for _ in prompts]
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [prompts[i] + options[j] for i, j in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        # the vocabulary-wide logits only where an option token is predicted (a long few-shot
        # prompt would otherwise need positions × vocabulary floats)
        hidden = loss_fn.body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for r, (i, j) in enumerate(chunk):
            p, o = len(prompts[i]), len(options[j])
            logits = loss_fn.head(hidden[r, p - 1 : p - 1 + o])
            if loss_fn.cap:
                logits = torch.tanh(logits / loss_fn.cap) * loss_fn.cap
            logp = F.log_softmax(logits.float(), -1)
            tgt = torch.tensor(options[j], device=logp.device)
            scores[i][j] = float(logp.gather(1, tgt[:, None]).sum())
    return scores


def run_task(model, tokenizer, task: Task, data: dict[str, list[dict]], *, shots: int, seed: int, mode: str,
             limit: int | None, batch_size: int, device: str = "cpu", progress: bool = False) -> dict:
    """Score one task at one number of shots; returns metrics and per-item predictions."""
    from glotkit.eval.metrics import classification_scores, correlation_scores
    from glotkit.generate.local import generate_greedy

    test = data["test"][:limit] if limit else data["test"]
    if not test:
        raise GlotkitError(f"task '{task.name}': empty test split")
    check_template(task, test[0])
    texts = [build_prompt(task, r, draw_shots(data["train"], shots, seed, i)) for i, r in enumerate(test)]
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    if mode == "loglik" and task.kind == "classification":
        options = [tokenizer(" " + l, add_special_tokens=False)["input_ids"] for l in task.labels]
        ll = option_logliks(model, tokenizer, prompt_ids, options, batch_size, device)
        preds = [task.labels[max(range(len(row)), key=row.__getitem__)] for row in ll]
        gens = [None] * len(test)
    else:
        mode = "generate"
        gens = generate_greedy(model, tokenizer, prompt_ids, max_new_tokens=task.max_new_tokens,
                               batch_size=batch_size, device=device, progress=progress, desc=task.name)
        preds = [parse_label(g, task.labels) if task.kind == "classification" else parse_number(g) for g in gens]
    golds = [task.answer(r) if task.kind == "classification" else r["score"] for r in test]
    if task.kind == "classification":
        metrics = classification_scores([p or "" for p in preds], golds, task.labels)
        metrics["unparsed"] = sum(p is None for p in preds)
    else:
        metrics = correlation_scores(preds, golds, missing=2.5)
    return {"task": task.name, "shots": shots, "mode": mode, "seed": seed, "batch_size": batch_size,
            "template": task.template, "metrics": metrics,
            "predictions": [{"gold": g, "prediction": p, "generation": x} for g, p, x in zip(golds, preds, gens)]}


MAIN_METRIC = {"classification": "macro_f1", "regression": "spearman"}


def run_suite(model, tokenizer, tasks: Sequence[Task], *, shots: Sequence[int], seed: int, mode: str,
              limit: int | None, batch_size: int, data_root: Path, out_dir: Path, model_label: str,
              device: str = "cpu", log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
    """Every task at every number of shots; writes results.json, results.md and results.png."""
    from glotkit.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for task in tasks:
        data = task.load(data_root)
        for k in shots:
            r = run_task(model, tokenizer, task, data, shots=k, seed=seed, mode=mode, limit=limit,
                         batch_size=batch_size, device=device, progress=progress)
            r["model"] = model_label
            atomic_write_jsonl(out_dir / f"predictions-{task.name}-{k}shot.jsonl", r.pop("predictions"))
            results.append(r)
            main = MAIN_METRIC[task.kind]
            log(f"[glotkit] {task.name} {k}-shot ({r['mode']}): {main} {r['metrics'][main]:.2f}  (n={r['metrics']['n']})")
            atomic_write_json(out_dir / "results.json", results)
    lines = [f"# Task suite: {model_label}", "", f"seed {seed}, batch size {batch_size}, limit {limit}", "",
             "| task | shots | mode | metric | score | n | unparsed |", "|---|---:|---|---|---:|---:|---:|"]
    for r in results:
        task = BUILTIN_TASKS.get(r["task"])
        main = MAIN_METRIC[task.kind] if task else next(iter(r["metrics"]))
        m = r["metrics"]
        lines.append(f"| {r['task']} | {r['shots']} | {r['mode']} | {main} | {m[main]:.2f} | {m['n']} | {m.get('unparsed', 0)} |")
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    _chart(results, out_dir / "results.png")
    return results


def _chart(results: list[dict], path: Path) -> None:
    from glotkit.io import new_figure, save_figure

    fig, ax = new_figure()
    for name in dict.fromkeys(r["task"] for r in results):
        rs = [r for r in results if r["task"] == name]
        task = BUILTIN_TASKS.get(name)
        main = MAIN_METRIC[task.kind] if task else next(iter(rs[0]["metrics"]))
        ax.plot([r["shots"] for r in rs], [r["metrics"][main] for r in rs], marker="o", label=f"{name} ({main})")
    ax.set_xlabel("shots")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
