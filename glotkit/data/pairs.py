"""Sentence pairs for the generator adapters (XL-LoRA) and anchor sentences for synthesis.

Pair files: CSV (header row), TSV or JSONL with an anchor column and an output column, e.g. the
XL-LoRA files ``sent0,sent1`` (positives) and ``sent0,hard_neg`` (hard negatives).  Anchor
files: plain text (one sentence per line), JSONL or CSV with a named field.
"""

from __future__ import annotations

import random
from pathlib import Path

from glotkit.errors import GlotkitError


def _records(path: Path, where: str) -> tuple[list[dict], list[str]]:
    from glotkit.io import read_table

    return read_table(path, where, formats=(".csv", ".tsv", ".jsonl"))


def read_pairs(path: Path, anchor_field: str, output_field: str, *, where: str,
               max_pairs: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """(anchor, output) pairs; a seeded sample of ``max_pairs`` when given."""
    rows, fields = _records(path, where)
    for f in (anchor_field, output_field):
        if f not in fields:
            raise GlotkitError(f"{path}: {where}: no column '{f}' (columns: {', '.join(fields) or 'none'})")
    pairs = [(str(r[anchor_field]).strip(), str(r[output_field]).strip()) for r in rows
             if str(r.get(anchor_field) or "").strip() and str(r.get(output_field) or "").strip()]
    if not pairs:
        raise GlotkitError(f"{path}: {where}: no pairs with both '{anchor_field}' and '{output_field}'")
    if max_pairs and len(pairs) > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
    return pairs


def read_anchors(path: Path, field: str = "text", *, min_chars: int = 1,
                 limit: int | None = None) -> tuple[list[str], dict[str, int]]:
    """Anchor sentences (whitespace normalized) and counts: lines read, dropped as empty or
    shorter than ``min_chars``, dropped as duplicates of an earlier anchor."""
    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: anchors file not found")
    if path.suffix.lower() in (".jsonl", ".csv", ".tsv"):
        rows, fields = _records(path, "anchors")
        if field not in fields:
            raise GlotkitError(f"{path}: anchors: no field '{field}' (fields: {', '.join(fields) or 'none'})")
        texts = [str(r.get(field) or "") for r in rows]
    else:
        from glotkit.io import read_user_text

        texts = read_user_text(path).splitlines()
    texts = [" ".join(t.split()) for t in texts]
    usable = [t for t in texts if len(t) >= max(min_chars, 1)]
    if not usable:
        raise GlotkitError(f"{path}: anchors: no usable lines (all empty or shorter than {min_chars} characters)")
    out = list(dict.fromkeys(usable))
    stats = {"lines": len(texts), "empty_or_short": len(texts) - len(usable), "duplicate_anchors": len(usable) - len(out)}
    return (out[:limit] if limit else out), stats


def read_row_triplets(positive: Path, negative: Path, anchor_field: str, positive_field: str, negative_field: str, *,
                      where: str, limit: int, seed: int = 0) -> list[dict]:
    """(anchor, positive, hard negative) triplets from two row-aligned pair files (row i of the
    negative file holds the hard negative of row i of the positive file, as in XL-LoRA's data);
    a seeded sample of ``limit`` of them."""
    rows_p, fields_p = _records(Path(positive), where)
    rows_n, fields_n = _records(Path(negative), where)
    for path, fields, need in ((positive, fields_p, (anchor_field, positive_field)), (negative, fields_n, (negative_field,))):
        for f in need:
            if f not in fields:
                raise GlotkitError(f"{path}: {where}: no column '{f}' (columns: {', '.join(fields) or 'none'})")
    if len(rows_p) != len(rows_n):
        raise GlotkitError(f"{where}: the pair files are not row-aligned ({positive}: {len(rows_p)} rows, "
                           f"{negative}: {len(rows_n)})")
    out = [{"anchor": str(p[anchor_field]).strip(), "positive": str(p[positive_field]).strip(),
            "hard_negative": str(n[negative_field]).strip()} for p, n in zip(rows_p, rows_n)]
    out = [t for t in out if all(t.values())]
    random.Random(seed).shuffle(out)
    return out[:limit]

