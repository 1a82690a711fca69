"""The HIPE-2026 scores, as the campaign's scorer computes them (MISSION.md, section D).

Per file: the macro recall of each *target* of the file's data set, computed as scikit-learn's
``recall_score(average="macro", zero_division=0)`` does it (the classes are those in gold or
predictions; a class never in gold scores 0); a gold pair missing from the predictions, or a
null label, counts as FALSE.  The targets are the campaign's: the newspaper sets (``impresso``)
are scored on ``at`` over {TRUE, PROBABLE, FALSE} and ``isAt`` over {TRUE, FALSE}; the
literary-works surprise set (``surprise``, French texts of the 16th–18th centuries) on ``at``
alone, its ``isAt`` reported as null.  The file score is the mean of the targets' macro
recalls (so the ``at`` macro recall for the surprise set); the accuracy profile is the mean of
the file scores over languages.  The binary view maps PROBABLE to TRUE (gold and predictions)
before scoring ``at``.

Figures keep full precision; round where they are printed.  :func:`bootstrap_intervals` gives
seeded percentile intervals by resampling documents (within each file; the profile's from the
files' resamples).  numpy only.
"""

from __future__ import annotations

import re
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from glotkit.errors import GlotkitError
from glotkit.hipe.parse import AT_LABELS, ISAT_LABELS

PairKey = tuple[str, str, str]  # (document_id, pers_entity_id, loc_entity_id)
TARGETS = ("at", "isAt")
# the campaign's file names: HIPE-2026-v1.0-<dataset>-<split>-<language>.jsonl
_FILE_NAME = re.compile(r"^HIPE-2026-.+-(?P<dataset>[^-]+)-(?P<split>[^-]+)-(?P<language>[^-]+)\.jsonl$")
_DATASET_TARGETS = {"impresso": ("at", "isAt"), "surprise": ("at",)}


def parse_targets(text: str | Sequence[str], what: str = "targets") -> tuple[str, ...]:
    """``"at"`` / ``"at,isAt"`` (or a list) as targets in canonical order; anything else is an error."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise GlotkitError(f"{what} {','.join(names) or '(none)'}: give at or at,isAt"
                           + (f" ('{bad[0]}' is not a target)" if bad else ""))
    return tuple(t for t in TARGETS if t in names)


def targets_for(docs: Sequence[dict], name: str | Path | None = None) -> tuple[tuple[str, ...], str]:
    """The targets the campaign scores a gold file on, and why: from the data set in the file's
    name (``impresso``: at and isAt; ``surprise``: at), else from its documents (literary works,
    ``media.source_type`` "Literary text": at; newspapers: at and isAt)."""
    m = _FILE_NAME.match(Path(name).name) if name else None
    if m and m["dataset"] in _DATASET_TARGETS:
        return _DATASET_TARGETS[m["dataset"]], f"data set '{m['dataset']}' in the file name"
    kinds = [str((d.get("media") or {}).get("source_type") or "") for d in docs]
    literary = sum("literary" in k.lower() for k in kinds)
    if literary and literary < len(kinds):
        raise GlotkitError(f"{name or 'gold'}: {literary} of {len(kinds)} documents are literary works (scored on at "
                           "alone) and the others not; score the two kinds in separate files or give the targets")
    if literary:
        return ("at",), "literary works (media.source_type)"
    return ("at", "isAt"), "newspaper articles (media.source_type)" if any(kinds) else "the default"


def pair_labels(docs: Iterable[dict]) -> dict[PairKey, tuple[str, str]]:
    out = {}
    for d in docs:
        for p in d.get("sampled_pairs", []):
            out[(d["document_id"], p["pers_entity_id"], p["loc_entity_id"])] = (p.get("at") or "FALSE",
                                                                               p.get("isAt") or "FALSE")
    return out


def macro_recall(counts: np.ndarray) -> np.ndarray:
    """Macro recall of confusion matrices ``counts[..., gold, predicted]`` over the classes seen
    in gold or predictions (scikit-learn's ``recall_score(average="macro", zero_division=0)``);
    NaN where there is no pair."""
    counts = np.asarray(counts, dtype=float)
    gold, pred = counts.sum(-1), counts.sum(-2)
    seen = (gold + pred) > 0
    hit = np.diagonal(counts, axis1=-2, axis2=-1)
    recall = np.divide(hit, gold, out=np.zeros_like(hit), where=gold > 0)
    n = seen.sum(-1)
    return np.divide((recall * seen).sum(-1), n, out=np.full(n.shape, np.nan), where=n > 0)


def _binary(label: str) -> str:
    return "TRUE" if label == "PROBABLE" else label


class _Counts:
    """Per-document confusion counts of one file: ``view -> (documents, classes, classes)`` for
    ``at``, ``isAt`` and the binary ``at``; the classes are the fixed labels then any other label
    met (kept as classes of their own, as scikit-learn does)."""

    def __init__(self, gold_docs: Sequence[dict], pred: dict[PairKey, tuple[str, str]]):
        self.documents = len(gold_docs)
        per_doc = [[(g, pred.get(k, ("FALSE", "FALSE"))) for k, g in pair_labels([d]).items()] for d in gold_docs]
        self.pairs = sum(map(len, per_doc))
        self.views: dict[str, tuple[list[str], np.ndarray]] = {}
        for view, fixed, pick in (("at", AT_LABELS, lambda g: g[0]), ("isAt", ISAT_LABELS, lambda g: g[1]),
                                  ("at_binary", ("TRUE", "FALSE"), lambda g: _binary(g[0]))):
            seen = {pick(x) for doc in per_doc for pair in doc for x in pair}
            labels = list(fixed) + sorted(seen - set(fixed))
            index = {lab: i for i, lab in enumerate(labels)}
            c = np.zeros((len(per_doc), len(labels), len(labels)), dtype=np.int64)
            for i, doc in enumerate(per_doc):
                for g, p in doc:
                    c[i, index[pick(g)], index[pick(p)]] += 1
            self.views[view] = (labels, c)

    def recalls(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Macro recall per view, of the whole file or (``weights``: resamples × documents, how
        often each document is drawn) of each resample."""
        out = {}
        for view, (labels, c) in self.views.items():
            k = len(labels)
            total = c.sum(0) if weights is None else (weights @ c.reshape(len(c), k * k)).reshape(-1, k, k)
            out[view] = macro_recall(total)
        return out


def _mean(values: Sequence) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(sum(vals) / len(vals)) if vals else None


def _figures(r: dict[str, np.ndarray], targets: Sequence[str]):
    """(at, isAt or None, score, binary at, binary score) from a view -> recall mapping."""
    at, is_at, at_bin = r["at"], r["isAt"] if "isAt" in targets else None, r["at_binary"]
    parts, parts_bin = [at] if "at" in targets else [], [at_bin] if "at" in targets else []
    if is_at is not None:
        parts.append(is_at)
        parts_bin.append(is_at)
    return at, is_at, sum(parts) / len(parts), at_bin, sum(parts_bin) / len(parts_bin)


def _float(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _file_parts(gold_docs: Sequence[dict], pred_docs: Sequence[dict], where: str, targets, name):
    gold = pair_labels(gold_docs)
    unknown = sorted({d["document_id"] for d in pred_docs} - {d["document_id"] for d in gold_docs})
    if unknown:
        raise GlotkitError(f"{where}: unknown document id '{unknown[0]}' ({len(unknown)} not in the gold file)")
    pred = pair_labels(pred_docs)
    chosen = parse_targets(targets) if targets is not None else targets_for(gold_docs, name)[0]
    return gold, pred, chosen, _Counts(gold_docs, pred)


def score_file(gold_docs: list[dict], pred_docs: list[dict], where: str = "predictions",
               targets: str | Sequence[str] | None = None, name: str | Path | None = None) -> dict:
    """Scores of one predictions file against its gold file, on ``targets`` (None: as the
    campaign scores the data set, see :func:`targets_for`; ``name`` is the gold file's name).
    Unknown document ids are an error; gold pairs the predictions lack count as FALSE/FALSE."""
    gold, pred, chosen, counts = _file_parts(gold_docs, pred_docs, where, targets, name)
    at, is_at, score, at_bin, score_bin = _figures(counts.recalls(), chosen)
    pred_docs_ids = {d["document_id"] for d in pred_docs}

    def confusion(view: str, fixed: Sequence[str]) -> dict:
        c = counts.views[view][1]
        return {"labels": list(fixed), "matrix": c.sum(0)[:len(fixed), :len(fixed)].tolist()}

    return {
        "targets": list(chosen), "documents": counts.documents, "pairs": len(gold),
        "missing_pairs": sum(k not in pred for k in gold),
        "missing_documents": sum(d["document_id"] not in pred_docs_ids for d in gold_docs),
        "extra_pairs": sum(k not in gold for k in pred),
        "at_macro_recall": _float(at), "isAt_macro_recall": None if is_at is None else _float(is_at),
        "score": _float(score),
        "binary": {"at_macro_recall": _float(at_bin), "score": _float(score_bin)},
        "confusion": {"at": confusion("at", AT_LABELS)} | ({"isAt": confusion("isAt", ISAT_LABELS)}
                                                           if "isAt" in chosen else {}),
    }


def profile(per_language: dict[str, dict]) -> dict:
    """The accuracy profile: the mean of the file scores (and of the binary scores) over languages
    (each file scored on its own targets)."""
    if not per_language:
        raise GlotkitError("no language to average")
    return {"score": _mean([r["score"] for r in per_language.values()]),
            "binary_score": _mean([r["binary"]["score"] for r in per_language.values()]),
            "languages": sorted(per_language)}


def bootstrap_intervals(gold_by_file: Mapping[str, Sequence[dict]], pred_by_file: Mapping[str, Sequence[dict]],
                        targets: Mapping[str, str | Sequence[str] | None] | None = None, *,
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals over documents: each file's documents are drawn with
    replacement ``resamples`` times (a seeded stream per file name, so a file's interval does not
    depend on the other files), every figure of :func:`score_file` is computed on each resample,
    and the profile's resample is the mean of the files' (documents resampled within each
    language).  ``targets``: per file name, as for :func:`score_file` (None: the data set's).

    Returns ``{"level", "resamples", "seed", "files": {name: {"at_macro_recall": [lo, hi],
    "isAt_macro_recall": [lo, hi] | None, "score": [lo, hi], "binary": {...}}}, "profile":
    {"score": [lo, hi], "binary_score": [lo, hi]}}``."""
    if resamples < 1:
        raise GlotkitError(f"resamples {resamples}: give 1 or more")
    if not 0 < level < 1:
        raise GlotkitError(f"level {level}: give a fraction between 0 and 1")
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(samples: np.ndarray) -> list[float] | None:
        samples = samples[~np.isnan(samples)]
        return [float(x) for x in np.percentile(samples, q)] if samples.size else None

    files, score_samples, binary_samples = {}, [], []
    for name in sorted(gold_by_file):
        gold_docs = gold_by_file[name]
        _, _, chosen, counts = _file_parts(gold_docs, pred_by_file[name], f"predictions ({name})",
                                           (targets or {}).get(name), None)
        n = counts.documents
        if not counts.pairs:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(str(name).encode("utf-8"))]))
        draws = rng.integers(0, n, size=(resamples, n))
        weights = np.bincount((draws + n * np.arange(resamples)[:, None]).ravel(),
                              minlength=resamples * n).reshape(resamples, n).astype(float)
        at, is_at, score, at_bin, score_bin = _figures(counts.recalls(weights), chosen)
        files[name] = {"at_macro_recall": interval(at), "isAt_macro_recall": None if is_at is None else interval(is_at),
                       "score": interval(score), "binary": {"at_macro_recall": interval(at_bin),
                                                            "score": interval(score_bin)}}
        score_samples.append(score)
        binary_samples.append(score_bin)
    with warnings.catch_warnings():  # a resample whose documents hold no pair is NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        prof = ({"score": interval(np.nanmean(np.stack(score_samples), 0)),
                 "binary_score": interval(np.nanmean(np.stack(binary_samples), 0))} if score_samples else
                {"score": None, "binary_score": None})
    return {"level": level, "resamples": resamples, "seed": seed, "files": files, "profile": prof}


def score_prediction_files(gold_path: str | Path, pred_path: str | Path, targets: str | Sequence[str] | None = None, *,
                           resamples: int = 1000, seed: int = 0, schema: str | Path | None = "default") -> dict:
    """The official figures of a predictions file against its gold file, both read and checked
    against the HIPE-2026 schema: per language (the campaign's files hold one language each; a
    file of several, such as a held-out split, is scored as one file per language) and the
    profile, with bootstrap intervals over documents (``ci``; none when ``resamples`` is 0), the
    targets and where they came from, and what the scorer filled in (gold pairs missing from the
    predictions, null labels: counted FALSE)."""
    from glotkit.hipe.data import default_schema, read_hipe

    gold_docs = read_hipe(gold_path, schema=schema)
    if not any(p.get("at") is not None for d in gold_docs for p in d.get("sampled_pairs", [])):
        raise GlotkitError(f"{gold_path}: no gold labels (all null: a _masked file?); give the file with the labels")
    pred_docs = read_hipe(pred_path, schema=schema)
    lang_of = {d["document_id"]: str(d.get("language") or "xx") for d in gold_docs}
    unknown = sorted({d["document_id"] for d in pred_docs} - set(lang_of))
    if unknown:
        raise GlotkitError(f"{pred_path}: unknown document id '{unknown[0]}' ({len(unknown)} not in the gold file "
                           f"{Path(gold_path).name})")
    gold_by, pred_by = {}, {}
    for d in gold_docs:
        gold_by.setdefault(lang_of[d["document_id"]], []).append(d)
    for d in pred_docs:
        pred_by.setdefault(lang_of[d["document_id"]], []).append(d)
    chosen, why = {}, {}
    for lang, docs in gold_by.items():
        chosen[lang], why[lang] = ((parse_targets(targets), "given") if targets is not None
                                   else targets_for(docs, gold_path))
    per = {lang: score_file(gold_by[lang], pred_by.get(lang, []), where=str(pred_path), targets=chosen[lang])
           | {"targets_from": why[lang],
              "null_labels": sum(p.get(t) is None for d in pred_by.get(lang, []) for p in d.get("sampled_pairs", [])
                                 for t in chosen[lang])}
           for lang in sorted(gold_by)}
    prof = profile(per)
    if resamples:
        ci = bootstrap_intervals(gold_by, {lang: pred_by.get(lang, []) for lang in gold_by}, chosen,
                                 resamples=resamples, seed=seed)
        for lang, r in per.items():
            r["ci"] = ci["files"].get(lang)
        prof["ci"] = ci["profile"] | {k: ci[k] for k in ("level", "resamples", "seed")}
    return {"gold": str(gold_path), "predictions": str(pred_path),
            "schema_checked": schema is not None and (schema != "default" or default_schema() is not None),
            "languages": per, "profile": prof}
