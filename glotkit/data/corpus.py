"""Plain-text corpora for continued pretraining: read documents, pack them into fixed-length rows.

Readers: ``.txt`` (one document per file), ``.jsonl`` (one document per line, a text field),
TEI XML (``.xml``, e.g. the ELTeC novels: the text of ``<body>``, with ``<note>`` and the TEI
header dropped, one paragraph per line), and folders of such files.  Romanian text can have its
legacy cedilla letters ş/ţ corrected to ș/ț on the way in.

Packing: documents are tokenized (BOS at the start of each, EOS at the end), concatenated and cut
into rows of ``block_size`` tokens.  Each piece of a document in a row is its own segment with
positions counted from the document's start, and attends only to its own document: nothing
crosses a document boundary, and no token is asked to predict the next document's first token.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from glotkit.data.prompts import IGNORE
from glotkit.data.text import fix_romanian_diacritics
from glotkit.errors import GlotkitError
from glotkit.io import iter_jsonl_objects, read_user_text

TEI_NS = "{http://www.tei-c.org/ns/1.0}"
_TEXT_SUFFIXES = {".txt", ".jsonl", ".xml"}


@dataclass
class Document:
    id: str
    text: str


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def tei_body_text(path: Path) -> str:
    """The running text of a TEI file's ``<body>``: paragraphs and headings, notes dropped."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise GlotkitError(f"{path}: not well-formed XML ({err})") from None
    body = next((el for el in root.iter() if _local(el.tag) == "body"), None)
    if body is None:
        raise GlotkitError(f"{path}: TEI file has no <body>")
    blocks: list[str] = []

    def text_of(el) -> str:
        parts = [el.text or ""]
        for child in el:
            if _local(child.tag) not in ("note", "gap", "fw"):
                parts.append(text_of(child))
            parts.append(child.tail or "")
        return "".join(parts)

    def walk(el) -> None:
        for child in el:
            name = _local(child.tag)
            if name in ("note", "gap", "fw"):
                continue
            if name in ("p", "head", "l", "trailer"):
                txt = " ".join(text_of(child).split())  # a block with everything inside it
                if txt:
                    blocks.append(txt)
            else:
                walk(child)

    walk(body)
    return "\n".join(blocks)


def _files(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
            if not found:
                raise GlotkitError(f"{p}: no .txt, .jsonl or .xml files in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise GlotkitError(f"{p}: corpus file not found")
    return out


def read_documents(paths: Sequence[str | Path], text_field: str = "text", language: str | None = None,
                   fix_diacritics: bool = True) -> list[Document]:
    """Read every document of the given files/folders, in a stable order."""
    docs: list[Document] = []
    for f in _files(paths):
        suffix = f.suffix.lower()
        try:
            if suffix == ".xml":
                docs.append(Document(f.stem, tei_body_text(f)))
            elif suffix == ".jsonl":
                for n, rec in iter_jsonl_objects(f):
                    if text_field not in rec:
                        raise GlotkitError(f"{f}: line {n}: missing field '{text_field}' (set pretrain.text_field)")
                    docs.append(Document(f"{f.stem}:{n}", str(rec[text_field])))
            else:
                docs.append(Document(f.stem, read_user_text(f)))
        except OSError as err:
            raise GlotkitError(f"{f}: cannot read ({err.strerror})") from None
    lang = (language or "").lower()
    docs = [Document(d.id, d.text.strip()) for d in docs]
    if fix_diacritics and lang in ("ro", "ron", "rum", "mo"):
        docs = [Document(d.id, fix_romanian_diacritics(d.text)) for d in docs]
    docs = [d for d in docs if d.text]
    if not docs:
        raise GlotkitError(f"{', '.join(map(str, paths))}: no text found in the corpus")
    return docs


def split_documents(docs: Sequence, heldout_ratio: float, seed: int,
                    setting: str = "pretrain.heldout_ratio") -> tuple[list, list]:
    """A seeded split by document (never inside one) into train and held-out, in input order;
    any sequence of documents (``Document`` objects, HIPE dicts)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(docs) * heldout_ratio)) if heldout_ratio > 0 else 0
    if n >= len(docs):
        raise GlotkitError(f"{setting}={heldout_ratio}: only {len(docs)} documents, too few to hold some out")
    held = sorted(order[:n])
    keep = sorted(order[n:])
    return [docs[i] for i in keep], [docs[i] for i in held]


def tokenize_documents(docs: Iterable[Document], tokenizer) -> list[list[int]]:
    """Token ids per document: BOS (if the tokenizer has one) + text + EOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [bos + tokenizer(d.text, add_special_tokens=False)["input_ids"] + eos for d in docs]


def pack_documents(token_docs: Sequence[list[int]], block_size: int):
    """Cut the concatenated documents into rows of at most ``block_size`` tokens.

    Returns :class:`glotkit.models.lm.Row` objects: one segment per document piece, positions
    from the start of that piece's document, targets the next token of the same document only.
    (A document longer than a block continues in the next row; its later positions continue.)
    """
    from glotkit.models.lm import Row

    rows = []
    ids: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    tg: list[int] = []
    k = 0

    def flush():
        nonlocal ids, pos, seg, tg, k
        if ids:
            rows.append(Row(ids, pos, seg, tg, n_examples=max(1, len(set(seg))), n_tokens=len(ids)))
        ids, pos, seg, tg, k = [], [], [], [], 0

    for doc in token_docs:
        start = 0
        while start < len(doc):
            room = block_size - len(ids)
            piece = doc[start : start + room]
            k += 1
            ids += piece
            # positions restart with the piece (a continued document does not see its earlier part)
            pos += range(len(piece))
            seg += [k] * len(piece)
            # the next token of the same piece; the piece's last token has no target in this row
            tg += piece[1:] + [IGNORE]
            start += len(piece)
            if len(ids) >= block_size:
                flush()
    flush()
    return rows
