"""The HIPE-2026 scores, as the task defines them (MISSION.md, section D).

Per file (one language): macro recall of ``at`` over {TRUE, PROBABLE, FALSE} and of ``isAt`` over
{TRUE, FALSE}, computed as scikit-learn's ``recall_score(average="macro")`` does it (the classes
are those in gold or predictions; a class never in gold scores 0); a gold pair missing from the
predictions, or predicted null, counts as FALSE.  The file score is the mean of the two; the
accuracy profile is the mean of the file scores over languages.  The binary view maps PROBABLE
to TRUE before scoring ``at``.
"""

from __future__ import annotations

from typing import Iterable

from glotkit.errors import GlotkitError
from glotkit.hipe.parse import AT_LABELS, ISAT_LABELS

PairKey = tuple[str, str, str]  # (document_id, pers_entity_id, loc_entity_id)


def pair_labels(docs: Iterable[dict]) -> dict[PairKey, tuple[str, str]]:
    out = {}
    for d in docs:
        for p in d.get("sampled_pairs", []):
            out[(d["document_id"], p["pers_entity_id"], p["loc_entity_id"])] = (p.get("at") or "FALSE",
                                                                               p.get("isAt") or "FALSE")
    return out


def _macro_recall(gold: list[str], pred: list[str]) -> float:
    from sklearn.metrics import recall_score

    return float(recall_score(gold, pred, average="macro", zero_division=0))


def score_file(gold_docs: list[dict], pred_docs: list[dict], where: str = "predictions") -> dict:
    """Scores of one predictions file against its gold file; unknown document ids are an error."""
    from sklearn.metrics import confusion_matrix

    gold = pair_labels(gold_docs)
    gold_ids = {d["document_id"] for d in gold_docs}
    unknown = sorted({d["document_id"] for d in pred_docs} - gold_ids)
    if unknown:
        raise GlotkitError(f"{where}: unknown document id '{unknown[0]}' ({len(unknown)} not in the gold file)")
    pred = pair_labels(pred_docs)
    keys = sorted(gold)
    missing = sum(k not in pred for k in keys)
    g_at = [gold[k][0] for k in keys]
    g_is = [gold[k][1] for k in keys]
    p_at = [pred.get(k, ("FALSE", "FALSE"))[0] for k in keys]
    p_is = [pred.get(k, ("FALSE", "FALSE"))[1] for k in keys]
    at, is_at = _macro_recall(g_at, p_at), _macro_recall(g_is, p_is)
    binary = lambda xs: ["TRUE" if x == "PROBABLE" else x for x in xs]  # noqa: E731
    at_bin = _macro_recall(binary(g_at), binary(p_at))
    return {
        "pairs": len(keys), "missing_pairs": missing,
        "at_macro_recall": round(at, 4), "isAt_macro_recall": round(is_at, 4), "score": round((at + is_at) / 2, 4),
        "binary": {"at_macro_recall": round(at_bin, 4), "score": round((at_bin + is_at) / 2, 4)},
        "confusion": {
            "at": {"labels": list(AT_LABELS), "matrix": confusion_matrix(g_at, p_at, labels=list(AT_LABELS)).tolist()},
            "isAt": {"labels": list(ISAT_LABELS), "matrix": confusion_matrix(g_is, p_is, labels=list(ISAT_LABELS)).tolist()},
        },
    }


def profile(per_language: dict[str, dict]) -> dict:
    """The accuracy profile: the mean of the file scores (and of the binary scores) over languages."""
    if not per_language:
        raise GlotkitError("no language to average")
    n = len(per_language)
    return {"score": round(sum(r["score"] for r in per_language.values()) / n, 4),
            "binary_score": round(sum(r["binary"]["score"] for r in per_language.values()) / n, 4),
            "languages": sorted(per_language)}
