"""Small file helpers: every output is written to a temporary name and renamed when complete,
so a crash or ``kill -9`` never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Hashable


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def atomic_write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def new_figure(width: float = 6, height: float = 3.5, nrows: int = 1, ncols: int = 1):
    """A matplotlib figure and axes on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), dpi=110, squeeze=nrows * ncols == 1)


def save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG atomically and release it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def iter_jsonl_objects(path: Path):
    """``(line number, object)`` for each non-blank line of a JSONL file; a line that is not a
    JSON object is a one-line :class:`GlotkitError` naming the file and line."""
    from glotkit.errors import GlotkitError

    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise GlotkitError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise GlotkitError(f"{path}: line {lineno}: expected a JSON object")
            yield lineno, rec


def sha256_of_files(paths) -> str | None:
    """One sha256 over the bytes of the given files in order (None when none exists)."""
    import hashlib

    h, seen = hashlib.sha256(), False
    for p in paths:
        p = Path(p)
        if p.is_file():
            seen = True
            with p.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest() if seen else None


def read_table(path: Path, where: str,
               formats: tuple[str, ...] = (".jsonl", ".csv", ".tsv", ".json")) -> tuple[list[dict], list[str]]:
    """Records and field names of a data file: JSONL, CSV or TSV with a header row, or a JSON list
    of objects.  Errors are one line naming the file and ``where`` it was asked for."""
    import csv

    from glotkit.errors import GlotkitError

    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: {where}: file not found")
    suffix = path.suffix.lower()
    if suffix not in formats:
        raise GlotkitError(f"{path}: {where}: unknown format '{suffix}' (use {', '.join(formats)})")
    if suffix == ".jsonl":
        rows = [rec for _, rec in iter_jsonl_objects(path)]
        fields = list(dict.fromkeys(k for r in rows[:50] for k in r))
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise GlotkitError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise GlotkitError(f"{path}: expected a JSON list of objects")
        fields = list(dict.fromkeys(k for r in rows[:50] for k in r))
    else:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    return rows, fields


def read_appended(path: Path, key: Callable[[dict], Hashable]) -> dict:
    """The rows of a JSONL file that a resumable stage appends to (one fsynced batch at a time),
    by ``key``; a torn last line (the process was killed mid-write) is cut off the file first."""
    done: dict = {}
    path = Path(path)
    if not path.is_file():
        return done
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1] if not data.endswith(b"\n") else data
    if len(keep) != len(data):
        with path.open("r+b") as fh:
            fh.truncate(len(keep))
    for line in keep.decode("utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            done[key(r)] = r
    return done


def append_rows(fh, rows) -> None:
    """Append JSONL rows to an open file and make them durable (flush + fsync)."""
    for r in rows:
        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())
