"""HIPE-2026 JSONL: reading with schema validation, seeded document splits, prediction files,
and the article excerpt a prompt shows (the prompt formats are in ``formats.py``).

Validation uses the task's own JSON schema (``schemas/hipe-2026-data.schema.json`` of the data
release; by default the copy beside the checkout in ``../shared/data/hipe-2026``) through the
``jsonschema`` library, and adds what a schema cannot say: a pair whose mention lists are empty
is an error.  Every error is one line naming the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from glotkit.errors import GlotkitError

DEFAULT_SCHEMA = Path("..") / "shared" / "data" / "hipe-2026" / "schemas" / "hipe-2026-data.schema.json"


def default_schema() -> Path | None:
    here = Path(__file__).resolve().parents[3] / "shared" / "data" / "hipe-2026" / "schemas" / "hipe-2026-data.schema.json"
    return here if here.is_file() else (DEFAULT_SCHEMA if DEFAULT_SCHEMA.is_file() else None)


def _validator(schema: Path | None):
    if schema is None:
        return None
    from jsonschema import Draft202012Validator

    from glotkit.io import read_json_file

    if not Path(schema).is_file():
        raise GlotkitError(f"{schema}: HIPE schema file not found")
    doc = read_json_file(Path(schema))
    if not isinstance(doc, dict):
        raise GlotkitError(f"{schema}: not a JSON schema (expected a JSON object)")
    return Draft202012Validator(doc)


def _where(error) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "(document)"


def read_hipe(path: str | Path, schema: str | Path | None = "default") -> list[dict]:
    """Documents of a HIPE-2026 JSONL file, validated; ``schema=None`` skips the schema check.

    Pairs are keyed by (document_id, pers_entity_id, loc_entity_id) in predictions and scores, so a
    document id that appears twice in the file, or a (person, location) pair twice in a document,
    is an error naming the line."""
    from glotkit.io import check_unique, iter_jsonl_objects

    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: HIPE file not found")
    validator = _validator(default_schema() if schema == "default" else (Path(schema) if schema else None))
    docs, doc_ids = [], []
    for lineno, doc in iter_jsonl_objects(path):
        if validator is not None:
            err = next(iter(sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))), None)
            if err is not None:
                raise GlotkitError(f"{path}: line {lineno}: {_where(err)}: {err.message}")
        for i, pair in enumerate(doc.get("sampled_pairs") or []):
            for field in ("pers_mentions_list", "loc_mentions_list"):
                if not [m for m in pair.get(field) or [] if str(m).strip()]:
                    raise GlotkitError(f"{path}: line {lineno}: sampled_pairs[{i}].{field}: empty (a pair needs its mentions)")
        pairs = [(f"line {lineno}: sampled_pairs[{i}]", (p.get("pers_entity_id"), p.get("loc_entity_id")))
                 for i, p in enumerate(doc.get("sampled_pairs") or [])
                 if isinstance(p, dict) and p.get("pers_entity_id") is not None]
        check_unique(pairs, path, "(pers_entity_id, loc_entity_id) pair", " in the document")
        if doc.get("document_id") is not None:
            doc_ids.append((f"line {lineno}", doc["document_id"]))
        docs.append(doc)
    check_unique(doc_ids, path, "document_id", "; document ids must be unique in a file")
    if not docs:
        raise GlotkitError(f"{path}: no documents")
    return docs


def split_by_document(docs: Sequence[dict], heldout_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded split by document, so no held-out document is ever trained on."""
    from glotkit.data.corpus import split_documents

    return split_documents(docs, heldout_ratio, seed, setting="heldout_ratio")


def predictions_docs(gold_docs: Sequence[dict], labels: dict[tuple[str, str, str], tuple[str, str]]) -> list[dict]:
    """The gold documents with each pair's ``at`` / ``isAt`` replaced by the prediction (strings;
    a pair without one gets FALSE/FALSE) and no explanations: same document ids, pair ids and
    order as the input, so the official scorer accepts the file."""
    out = []
    for d in gold_docs:
        pairs = []
        for p in d.get("sampled_pairs", []):
            at, is_at = labels.get((d["document_id"], p["pers_entity_id"], p["loc_entity_id"]), ("FALSE", "FALSE"))
            pairs.append(dict(p, at=at, isAt=is_at, at_explanation=None, isAt_explanation=None))
        out.append(dict(d, sampled_pairs=pairs))
    return out


def write_predictions(path: str | Path, gold_docs: Sequence[dict], labels: dict[tuple[str, str, str], tuple[str, str]]) -> None:
    """:func:`predictions_docs` written atomically as JSONL."""
    from glotkit.io import atomic_write_jsonl

    atomic_write_jsonl(Path(path), predictions_docs(gold_docs, labels))


def excerpt(text: str, mentions: Sequence[str], max_chars: int) -> str:
    """The article, or when longer than ``max_chars`` the stretch of that length centred on the
    mentions: the window that covers the most mention occurrences (ties: the earliest), cut at
    whitespace and marked with "…" where text was left out."""
    if len(text) <= max_chars:
        return text
    spots = sorted(i for m in mentions if m for i in _find_all(text, m))
    if not spots:
        start = 0
    else:
        best, start = -1, 0
        for s in spots:
            lo = max(0, min(s - max_chars // 3, len(text) - max_chars))
            covered = sum(lo <= t < lo + max_chars for t in spots)
            if covered > best:
                best, start = covered, lo
    start, end = _cut(text, start, start + max_chars)
    return ("… " if start > 0 else "") + text[start:end] + (" …" if end < len(text) else "")


def marked_excerpt(text: str, persons: Sequence[str], places: Sequence[str], max_chars: int) -> str:
    """At most ``max_chars`` characters of the article around the place where a mention of the
    person and a mention of the place come closest, with every mention shown marked
    ``<person>…</person>`` / ``<place>…</place>`` and "…" where text was left out.  When those two
    mentions are farther apart than ``max_chars`` the excerpt is two stretches of half that length,
    one around each; when only one of them occurs, the stretch around its first mention.  How near
    the two are is the strongest single cue for ``at`` (on the gold training pairs the distance
    alone separates at≠FALSE from FALSE with an AUC of 0.66), and a small model cannot find that in
    a long article by itself."""
    spans = sorted(mention_spans(text, persons, "person") + mention_spans(text, places, "place"),
                   key=lambda s: (s[0], -(s[1] - s[0])))
    if len(text) <= max_chars:
        return _mark(text, spans, 0, len(text))
    pers = [s for s in spans if s[2] == "person"]
    locs = [s for s in spans if s[2] == "place"]
    if pers and locs:
        a, b = min(((a, b) for a in pers for b in locs), key=lambda ab: (abs(ab[0][0] - ab[1][0]), ab[0][0]))
        lo, hi = min(a[0], b[0]), max(a[1], b[1])
        if hi - lo <= max_chars - 20:
            windows = [_window(text, (lo + hi) // 2, max_chars)]
        else:
            first, second = sorted((a, b))
            windows = [_window(text, (s[0] + s[1]) // 2, max_chars // 2) for s in (first, second)]
    elif spans:
        windows = [_window(text, (spans[0][0] + spans[0][1]) // 2, max_chars)]
    else:
        windows = [_window(text, 0, max_chars)]
    parts = [_mark(text, spans, lo, hi) for lo, hi in windows]
    return (("… " if windows[0][0] > 0 else "") + " … ".join(parts)
            + (" …" if windows[-1][1] < len(text) else ""))


@dataclass(frozen=True)
class Placement:
    """Where the whole article mentions a pair: every person and place mention (start, end,
    kind), the article's length in words, and the words between the closest person and place
    mentions and whether a sentence ends between them (None when one of the two is missing)."""

    persons: list[tuple[int, int, str]]
    places: list[tuple[int, int, str]]
    words: int
    gap: int | None
    same_sentence: bool | None


def placement(text: str, persons: Sequence[str], places: Sequence[str]) -> Placement:
    pers, locs = mention_spans(text, persons, "person"), mention_spans(text, places, "place")
    gap = same = None
    if pers and locs:
        a, b = min(((a, b) for a in pers for b in locs), key=lambda ab: (abs(ab[0][0] - ab[1][0]), ab[0][0]))
        between = text[min(a[1], b[1]):max(a[0], b[0])] if max(a[0], b[0]) > min(a[1], b[1]) else ""
        gap, same = len(between.split()), not _SENTENCE_END.search(between)
    return Placement(pers, locs, len(text.split()), gap, same)


_SENTENCE_END = re.compile(r"[.!?;]\s")


def mention_facts(text: str, persons: Sequence[str], places: Sequence[str]) -> str:
    """One sentence of what the whole article says about where the pair is mentioned, which an
    excerpt cannot show: how often the person and the place occur, how long the article is, and
    how many words lie between their closest mentions, in one sentence or not (:func:`placement`)."""
    at = placement(text, persons, places)
    said = (f"The article has {at.words} words; the person is mentioned {_times(len(at.persons))}, "
            f"the place {_times(len(at.places))}")
    if at.gap is None:
        return said + "."
    where = "in the same sentence" if at.same_sentence else "in different sentences"
    return said + f"; their closest mentions are {at.gap} word{'s' if at.gap != 1 else ''} apart, {where}."


def _times(n: int) -> str:
    return "nowhere in the text" if n == 0 else "once" if n == 1 else f"{n} times"


def _window(text: str, centre: int, size: int) -> tuple[int, int]:
    """The stretch of ``size`` characters centred on ``centre``, cut at whitespace."""
    start = max(0, min(centre - size // 2, len(text) - size))
    return _cut(text, start, min(len(text), start + size))


def _cut(text: str, start: int, end: int) -> tuple[int, int]:
    """``start`` moved forward to the next word and ``end`` back to the last whole word (by at
    most 40 characters each) where they fall inside the text."""
    if start > 0:
        sp = text.find(" ", start)
        start = sp + 1 if 0 <= sp < start + 40 else start
    if end < len(text):
        sp = text.rfind(" ", start, end)
        end = sp if sp > end - 40 else end
    return start, end


def _mark(text: str, spans: Sequence[tuple[int, int, str]], start: int, end: int) -> str:
    """``text[start:end]`` with the spans wholly inside it marked (a span overlapping one already
    marked is left as it is)."""
    out, at = [], start
    for lo, hi, kind in spans:
        if lo < at or hi > end:
            continue
        out += [text[at:lo], f"<{kind}>", text[lo:hi], f"</{kind}>"]
        at = hi
    out.append(text[at:end])
    return "".join(out)


def mention_spans(text: str, mentions: Sequence[str], kind: str) -> list[tuple[int, int, str]]:
    """Every occurrence of the mentions (once each, in no particular order)."""
    return list({(i, i + len(m), kind) for m in mentions if m.strip() for i in _find_all(text, m)})


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out
