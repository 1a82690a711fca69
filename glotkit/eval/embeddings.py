"""Evaluation of sentence embeddings: STS (Spearman of cosine similarity against gold scores) and
bilingual retrieval on line-aligned pairs (query i's relevant document is document i):
accuracy@1, MRR@10, nDCG@10 and recall@10 — with one relevant document, nDCG@10 is 1/log2(rank+1)
when it ranks in the top 10; tests compare these with scikit-learn's ``ndcg_score``.

Every score carries a 95 % bootstrap interval (``<metric>_ci``): over sentence pairs for STS, over
queries for retrieval (the document pool stays whole).  Each result keeps its per-item values
(``items``: cosines, or the gold document's rank per query), so two models evaluated on the same
data are compared with a paired bootstrap (:func:`paired_changes`)."""

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


def _statistic(kind: str, items: dict, k: int = 10):
    import numpy as np

    from glotkit.eval.metrics import correlation_statistic, mean_statistic

    if kind == "sts":
        return correlation_statistic(items["cos"], items["gold"])
    ranks = np.asarray(items["ranks"], dtype=float)
    return mean_statistic({"accuracy@1": 100 * (ranks == 1), f"mrr@{k}": 100 * np.where(ranks <= k, 1.0 / ranks, 0.0),
                           f"ndcg@{k}": 100 * np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0),
                           f"recall@{k}": 100 * (ranks <= k)})


def _with_intervals(out: dict, kind: str, items: dict, seed: int = 0) -> dict:
    from glotkit.eval.uncertainty import method, statistic_intervals

    for name, ci in statistic_intervals(_statistic(kind, items), out["n"], seed=seed).items():
        out[f"{name}_ci"] = [round(ci[0], 2), round(ci[1], 2)]
    unit = "sentence pairs" if kind == "sts" else "queries (the document pool stays whole)"
    return out | {"ci_method": method(unit, seed=seed), "items": items}


def sts_spearman(emb_a, emb_b, scores: Sequence[float]) -> dict:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    cos = np.sum(emb_a * emb_b, axis=1)
    out = {"spearman": round(100 * float(spearmanr(cos, scores)[0]), 2),
           "pearson": round(100 * float(pearsonr(cos, scores)[0]), 2), "n": len(scores)}
    return _with_intervals(out, "sts", {"cos": [round(float(c), 6) for c in cos], "gold": [float(x) for x in scores]})


def retrieval_scores(queries, docs, k: int = 10) -> dict:
    """Query i's relevant document is document i (normalized embeddings, cosine ranking)."""
    import numpy as np

    sims = queries @ docs.T
    gold = np.diag(sims)[:, None]
    # rank of the gold document: 1 + documents scored strictly higher (ties count in its favour)
    ranks = 1 + (sims > gold).sum(axis=1)
    n = len(ranks)
    out = {
        "accuracy@1": round(100 * float(np.mean(ranks == 1)), 2),
        f"mrr@{k}": round(100 * float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0))), 2),
        f"ndcg@{k}": round(100 * float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0))), 2),
        f"recall@{k}": round(100 * float(np.mean(ranks <= k)), 2),
        "n": n,
    }
    return _with_intervals(out, "retrieval", {"ranks": [int(r) for r in ranks]})


METRIC_KEYS = ("spearman", "pearson", "accuracy@1", "mrr@10", "ndcg@10", "recall@10")


def metrics_of(scores: dict) -> dict[str, float]:
    """The plain metrics of one evaluation (no intervals, counts or per-item values)."""
    return {m: v for m, v in scores.items() if m in METRIC_KEYS}


def paired_changes(a: dict, b: dict, seed: int = 0) -> dict[str, dict]:
    """b − a for each metric of one evaluation that two models ran on the same items, with the
    paired bootstrap interval (over sentence pairs or queries) and whether it excludes zero."""
    from glotkit.eval.uncertainty import paired_statistic

    ia, ib = a.get("items"), b.get("items")
    if not ia or not ib or a.get("n") != b.get("n") or ia.get("gold") != ib.get("gold"):
        return {}
    kind = "sts" if "cos" in ia else "retrieval"
    return paired_statistic(_statistic(kind, ia), _statistic(kind, ib), a["n"], seed=seed)


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
    """Markdown: rows = measures, columns = models (e.g. base, trained) with 95 % intervals, and
    for two models the paired difference with its interval, marked * where it excludes zero."""
    from glotkit.eval.uncertainty import fmt, fmt_change

    models = list(results)
    rows = []
    for m in models:
        for task, scores in results[m].items():
            for metric in metrics_of(scores):
                if (task, metric) not in rows:
                    rows.append((task, metric))
    head = ["evaluation", "metric"] + models + (["Δ"] if len(models) == 2 else []) + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    changes = {}
    if len(models) == 2:
        for task in results[models[1]]:
            if task in results[models[0]]:
                changes[task] = paired_changes(results[models[0]][task], results[models[1]][task])
    for task, metric in rows:
        vals = [results[m].get(task, {}).get(metric) for m in models]
        cells = ["–" if v is None else fmt(v, results[m][task].get(f"{metric}_ci")) for m, v in zip(models, vals)]
        if len(models) == 2:
            d = changes.get(task, {}).get(metric)
            if None in vals:
                cells.append("–")
            elif d:
                cells.append(fmt_change(d))
            else:
                cells.append(f"{vals[1] - vals[0]:+.2f}")
        n = next((results[m][task]["n"] for m in models if task in results[m]), "")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)
