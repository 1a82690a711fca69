"""Small file helpers: every output is written to a temporary name and renamed when complete,
so a crash or ``kill -9`` never leaves a half-written file behind; and the one place that reads
users' data files (UTF-8 with or without a byte-order mark, no NUL bytes, CSV separators sniffed,
unique ids), each problem a one-line error naming the file and the line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Hashable


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: the old file stays, no temporary file is left
        tmp.unlink(missing_ok=True)
        raise


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


BOM = "\ufeff"


def _decode(path: Path, data: bytes, lineno: int = 1, offset: int = 0) -> str:
    """``data`` (the bytes of ``path`` from line ``lineno``, byte ``offset`` on) as text.  Invalid
    UTF-8 and NUL bytes are a one-line :class:`GlotkitError` naming the file, line and byte."""
    from glotkit.errors import GlotkitError

    nul = data.find(b"\x00")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        if nul < 0 or err.start < nul:
            line = lineno + data.count(b"\n", 0, err.start)
            utf16 = offset == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff")
            raise GlotkitError(f"{path}: line {line}: not UTF-8 text ({err.reason} at byte {offset + err.start}); "
                               f"{'it looks like UTF-16: ' if utf16 else ''}save the file as UTF-8") from None
        text = ""
    if nul >= 0:
        line = lineno + data.count(b"\n", 0, nul)
        raise GlotkitError(f"{path}: line {line}: NUL byte at byte {offset + nul} "
                           "(a binary file, or text saved as UTF-16?); save the file as UTF-8 text")
    return text


def _read_bytes(path: Path) -> bytes:
    from glotkit.errors import GlotkitError

    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise GlotkitError(f"{path}: cannot read ({err.strerror or err})") from None


def read_user_text(path: Path) -> str:
    """The text of a user's data file: UTF-8 (a leading byte-order mark is dropped); invalid UTF-8
    or a NUL byte is a one-line :class:`GlotkitError` naming the file, the line and the byte offset.
    Every reader of user data goes through here or :func:`iter_user_lines`."""
    text = _decode(Path(path), _read_bytes(path))
    return text[1:] if text.startswith(BOM) else text


def iter_user_lines(path: Path):
    """``(line number, line)`` of a user's text file, streamed (line ends kept), checked as
    :func:`read_user_text` checks the whole file."""
    from glotkit.errors import GlotkitError

    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as err:
        raise GlotkitError(f"{path}: cannot read ({err.strerror or err})") from None
    with fh:
        offset = 0
        for lineno, raw in enumerate(fh, 1):
            line = _decode(path, raw, lineno, offset)
            if lineno == 1 and line.startswith(BOM):
                line = line[1:]
            offset += len(raw)
            yield lineno, line


def iter_jsonl_objects(path: Path):
    """``(line number, object)`` for each non-blank line of a JSONL file; a line that is not a
    JSON object (or not UTF-8) is a one-line :class:`GlotkitError` naming the file and line."""
    from glotkit.errors import GlotkitError

    path = Path(path)
    for lineno, line in iter_user_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise GlotkitError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict):
            raise GlotkitError(f"{path}: line {lineno}: expected a JSON object")
        yield lineno, rec


def read_json_file(path: Path):
    """The JSON document of a user's file (UTF-8, a byte-order mark tolerated); errors are one line."""
    from glotkit.errors import GlotkitError

    try:
        return json.loads(read_user_text(path))
    except json.JSONDecodeError as err:
        raise GlotkitError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


CSV_DELIMITERS = (",", ";", "\t", "|")
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def _header_columns(line: str, delimiter: str) -> int:
    import csv

    return len(next(csv.reader([line], delimiter=delimiter), []))


def sniff_delimiter(text: str, preferred: str = ",") -> str:
    """The column separator of CSV text: ``preferred`` when it splits the header row, else the one of
    , ; tab | that does (several: :class:`csv.Sniffer` over the first lines decides)."""
    import csv

    lines = [ln for ln in text[:65536].splitlines() if ln.strip()][:20]
    if not lines:
        return preferred
    if _header_columns(lines[0], preferred) > 1:
        return preferred
    splitting = [d for d in CSV_DELIMITERS if _header_columns(lines[0], d) > 1]
    if len(splitting) <= 1:
        return splitting[0] if splitting else preferred
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters="".join(splitting)).delimiter
    except csv.Error:
        return max(splitting, key=lambda d: _header_columns(lines[0], d))


def read_csv_records(path: Path, delimiter: str | None = None,
                     preferred: str = ",") -> tuple[list[tuple[int, dict]], list[str]]:
    """``([(line number, record), ...], column names)`` of a CSV/TSV file with a header row.

    UTF-8 with or without Excel's byte-order mark; the separator is sniffed (see
    :func:`sniff_delimiter`) unless given; blank rows are skipped.  A row with more or fewer
    fields than the header, a column named twice, a NUL byte or invalid UTF-8 is a one-line
    :class:`GlotkitError` naming the file and line."""
    import csv
    import io

    from glotkit.errors import GlotkitError

    path = Path(path)
    text = read_user_text(path)
    delimiter = delimiter or sniff_delimiter(text, preferred)
    name = _DELIMITER_NAMES.get(delimiter, repr(delimiter))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields: list[str] | None = None
    records: list[tuple[int, dict]] = []
    start = 1
    try:
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not any(c.strip() for c in row):
                continue
            if fields is None:
                fields = [c.strip() for c in row]
                twice = next((f for i, f in enumerate(fields) if f and f in fields[:i]), None)
                if twice is not None:
                    raise GlotkitError(f"{path}: line {lineno}: column '{twice}' appears twice in the header")
                continue
            if len(row) != len(fields):
                hint = ""
                if len(fields) == 1:
                    other = [d for d in CSV_DELIMITERS if d != delimiter and d in fields[0]]
                    hint = f"; is the file separated by {other[0]!r}?" if other else ""
                raise GlotkitError(f"{path}: line {lineno}: {len(row)} fields, the header has {len(fields)} "
                                   f"({name}-separated){hint}")
            records.append((lineno, dict(zip(fields, row))))
    except csv.Error as err:
        raise GlotkitError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None
    return records, fields or []


def check_unique(items, path: Path, what: str = "id", hint: str = "") -> None:
    """Refuse a key seen twice: ``items`` are ``(location, key)`` (e.g. ``("line 7", "q12")``); the
    error is one line naming the file, the location of the second occurrence, the key, where it
    was first, and ``hint``.  Readers that key examples by id (predictions, resuming, scoring) call this, since
    a repeated id would score one example twice and the other never."""
    from glotkit.errors import GlotkitError

    first: dict = {}
    for loc, key in items:
        if key in first:
            raise GlotkitError(f"{path}: {loc}: duplicate {what} {key!r} (first at {first[key]}){hint}")
        first[key] = loc


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


def read_table_records(path: Path, where: str, formats: tuple[str, ...] = (".jsonl", ".csv", ".tsv", ".json"),
                       ) -> tuple[list[tuple[str, dict]], list[str]]:
    """``([(location, record), ...], field names)`` of a data file: JSONL, CSV or TSV with a header
    row, or a JSON list of objects; the location is "line N" (JSONL, CSV) or "record N" (JSON).
    Errors are one line naming the file and ``where`` it was asked for."""
    from glotkit.errors import GlotkitError

    path = Path(path)
    if not path.is_file():
        raise GlotkitError(f"{path}: {where}: file not found")
    suffix = path.suffix.lower()
    if suffix not in formats:
        raise GlotkitError(f"{path}: {where}: unknown format '{suffix}' (use {', '.join(formats)})")
    if suffix == ".jsonl":
        recs = [(f"line {n}", rec) for n, rec in iter_jsonl_objects(path)]
    elif suffix == ".json":
        rows = read_json_file(path)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise GlotkitError(f"{path}: expected a JSON list of objects")
        recs = [(f"record {i + 1}", r) for i, r in enumerate(rows)]
    else:
        lines, fields = read_csv_records(path, preferred="\t" if suffix == ".tsv" else ",")
        return [(f"line {n}", r) for n, r in lines], fields
    fields = list(dict.fromkeys(k for _, r in recs[:50] for k in r))
    return recs, fields


def read_table(path: Path, where: str,
               formats: tuple[str, ...] = (".jsonl", ".csv", ".tsv", ".json")) -> tuple[list[dict], list[str]]:
    """Records and field names of a data file (see :func:`read_table_records`)."""
    recs, fields = read_table_records(path, where, formats)
    return [r for _, r in recs], fields


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
