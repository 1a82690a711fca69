"""Evaluation of sentence embeddings: STS (Spearman of cosine similarity against gold scores) and
bilingual retrieval on line-aligned pairs (query i's relevant document is document i):
accuracy@1, MRR@10, nDCG@10 and recall@10 — with one relevant document, nDCG@10 is 1/log2(rank+1)
when it ranks in the top 10; tests compare these with scikit-learn's ``ndcg_score``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from glotkit.errors import GlotkitError
from glotkit.io import read_user_text


def read_sts(path: Path) -> tuple[list[str], list[str], list[float]]:
    """RO-STS style TSV: score<TAB>sentence 1<TAB>sentence 2."""
    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: STS file not found")
    a, b, scores = [], [], []
    for lineno, line in enumerate(read_user_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            score = float(parts[0])
            if not math.isfinite(score):
                raise ValueError
        except ValueError:
            raise GlotkitError(f"{path}: line {lineno}: expected score<TAB>sentence1<TAB>sentence2") from None
        if len(parts) != 3:
            raise GlotkitError(f"{path}: line {lineno}: expected 3 tab-separated columns, got {len(parts)}")
        scores.append(score)
        a.append(parts[1])
        b.append(parts[2])
    if not scores:
        raise GlotkitError(f"{path}: no STS pairs")
    return a, b, scores


def read_parallel(src: Path, tgt: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Two line-aligned files (e.g. RO-STS.dev.ro / .en); empty lines and duplicates dropped together."""
    for p in (src, tgt):
        if not Path(p).is_file():
            raise GlotkitError(f"{p}: parallel file not found")
    xs = read_user_text(Path(src)).splitlines()
    ys = read_user_text(Path(tgt)).splitlines()
    if len(xs) != len(ys):
        raise GlotkitError(f"{src} and {tgt}: not line-aligned ({len(xs)} vs {len(ys)} lines)")
    seen, out_x, out_y = set(), [], []
    for x, y in zip(xs, ys):
        if x.strip() and y.strip() and x not in seen and y not in seen:
            seen.update((x, y))
            out_x.append(x)
            out_y.append(y)
    if limit:
        out_x, out_y = out_x[:limit], out_y[:limit]
    return out_x, out_y


def sts_spearman(emb_a, emb_b, scores: Sequence[float]) -> dict:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    cos = np.sum(emb_a * emb_b, axis=1)
    return {"spearman": round(100 * float(spearmanr(cos, scores)[0]), 2),
            "pearson": round(100 * float(pearsonr(cos, scores)[0]), 2), "n": len(scores)}


def retrieval_scores(queries, docs, k: int = 10) -> dict:
    """Query i's relevant document is document i (normalized embeddings, cosine ranking)."""
    import numpy as np

    sims = queries @ docs.T
    gold = np.diag(sims)[:, None]
    # rank of the gold document: 1 + documents scored strictly higher (ties count in its favour)
    ranks = 1 + (sims > gold).sum(axis=1)
    n = len(ranks)
    return {
        "accuracy@1": round(100 * float(np.mean(ranks == 1)), 2),
        f"mrr@{k}": round(100 * float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0))), 2),
        f"ndcg@{k}": round(100 * float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0))), 2),
        f"recall@{k}": round(100 * float(np.mean(ranks <= k)), 2),
        "n": n,
    }


def read_pair_file(path: Path, source_field: str, target_field: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """A user's pair file (CSV/TSV/JSONL, two columns) for retrieval; duplicates dropped."""
    from glotkit.data.pairs import read_pairs

    pairs = read_pairs(path, source_field, target_field, where="embed.parallel")
    seen, xs, ys = set(), [], []
    for x, y in pairs:
        if x not in seen and y not in seen:
            seen.update((x, y))
            xs.append(x)
            ys.append(y)
    return (xs[:limit], ys[:limit]) if limit else (xs, ys)


def evaluate_embeddings(model, *, sts: Path | None = None, parallel: Sequence = (),
                        prompt: str | None = None, limit: int | None = None, batch_size: int = 64) -> dict:
    """{"sts": {...}, "ro→en": {...}, "en→ro": {...}, ...} for one model; ``parallel`` holds
    ``ParallelEval`` items (line-aligned files or a pair file)."""
    from glotkit.models.encoders import encode

    out = {}
    if sts:
        a, b, scores = read_sts(sts)
        if limit:
            a, b, scores = a[:limit], b[:limit], scores[:limit]
        out["sts"] = sts_spearman(encode(model, a, batch_size, prompt), encode(model, b, batch_size, prompt), scores)
    for item in parallel:  # config.ParallelEval
        name = item.name
        xs, ys = (read_pair_file(Path(item.file), item.source_field, item.target_field, limit) if item.file
                  else read_parallel(Path(item.source), Path(item.target), limit))
        ex, ey = encode(model, xs, batch_size, prompt), encode(model, ys, batch_size, prompt)
        a, b = name.split("-", 1) if "-" in name else (name, "target")
        out[f"{a}→{b}"] = retrieval_scores(ex, ey)
        out[f"{b}→{a}"] = retrieval_scores(ey, ex)
    return out


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown: rows = measures, columns = models (e.g. base, trained), with the difference."""
    models = list(results)
    rows = []
    for m in models:
        for task, scores in results[m].items():
            for metric in scores:
                if metric != "n" and (task, metric) not in rows:
                    rows.append((task, metric))
    head = ["evaluation", "metric"] + models + (["Δ"] if len(models) == 2 else []) + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for task, metric in rows:
        vals = [results[m].get(task, {}).get(metric) for m in models]
        cells = ["–" if v is None else f"{v:.2f}" for v in vals]
        if len(models) == 2:
            cells.append("–" if None in vals else f"{vals[1] - vals[0]:+.2f}")
        n = next((results[m][task]["n"] for m in models if task in results[m]), "")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)
