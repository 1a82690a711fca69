"""Parse a model's answer into the two HIPE-2026 labels.

The model writes a short explanation and a JSON object with ``at`` and ``isAt``.  We take the
first balanced ``{...}`` (string-aware: braces inside strings do not count), after removing code
fences, tolerate trailing commas, upper-case and validate the labels.  On any failure the pair
gets FALSE/FALSE and the failure is counted by the caller.  Consistency: ``isAt`` TRUE means the
person was there, so ``at`` FALSE is raised to TRUE (and counted).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

AT_LABELS = ("TRUE", "PROBABLE", "FALSE")
ISAT_LABELS = ("TRUE", "FALSE")
# the (at, isAt) combinations that can be true: isAt TRUE says the person was there, so at is TRUE or PROBABLE
VALID_LABELS = (("TRUE", "TRUE"), ("PROBABLE", "TRUE"), ("TRUE", "FALSE"), ("PROBABLE", "FALSE"), ("FALSE", "FALSE"))


@dataclass
class Parsed:
    at: str
    isAt: str
    ok: bool  # False: no usable JSON; the labels are the FALSE/FALSE fallback
    corrected: bool = False  # at raised to TRUE because isAt was TRUE
    error: str | None = None


def first_json_object(text: str) -> str | None:
    """The first balanced {...} in ``text``, quotes and escapes respected; None if there is none."""
    text = re.sub(r"```(?:json|JSON)?", "", text)
    start = text.find("{")
    while start >= 0:
        depth, in_str, esc = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)  # unbalanced: try the next opening brace
    return None


def _label(value, allowed: tuple[str, ...]) -> str | None:
    if isinstance(value, bool):
        value = "TRUE" if value else "FALSE"
    if not isinstance(value, str):
        return None
    v = value.strip().upper()
    return v if v in allowed else None


def parse_answer(text: str) -> Parsed:
    blob = first_json_object(text)
    if blob is None:
        return Parsed("FALSE", "FALSE", False, error="no JSON object")
    cleaned = re.sub(r",\s*([}\]])", r"\1", blob)  # trailing commas
    try:
        obj = json.loads(cleaned)
    except json.JSONDecodeError as err:
        return Parsed("FALSE", "FALSE", False, error=f"invalid JSON ({err.msg})")
    keys = {k.lower(): v for k, v in obj.items()} if isinstance(obj, dict) else {}
    at, is_at = _label(keys.get("at"), AT_LABELS), _label(keys.get("isat"), ISAT_LABELS)
    if at is None or is_at is None:
        missing = "at" if at is None else "isAt"
        return Parsed("FALSE", "FALSE", False, error=f"missing or invalid '{missing}'")
    if is_at == "TRUE" and at == "FALSE":
        return Parsed("TRUE", is_at, True, corrected=True)
    return Parsed(at, is_at, True)
