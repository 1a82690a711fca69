"""Is an explanation worth distilling?  A rationale should name the person and the place of its
pair and rest on the article: quote it (a run of four words that the article has) or paraphrase
it (most of its content words occur in the article).  The checks are lexical and cheap; they say
nothing about whether the reasoning is right, only that it is about this pair and this text."""

from __future__ import annotations

import re
from typing import Sequence

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def names(explanation: str, mentions: Sequence[str]) -> bool:
    """Whether the explanation names one of the mentions: a word of 4+ letters of a mention (a
    surname without its title, "Meier" for "Herr Meier"), or a short mention whole, is a word of
    the explanation."""
    have = set(words(explanation))
    for m in mentions:
        long = [w for w in words(m) if len(w) >= 4]
        if (long and any(w in have for w in long)) or (not long and words(m) and all(w in have for w in words(m))):
            return True
    return False


def grounded(explanation: str, article: str, mentions: Sequence[str] = (), min_quote: int = 4,
             min_share: float = 0.6) -> bool:
    """A quote (``min_quote`` consecutive words the article also has in that order) or a paraphrase
    (at least ``min_share`` of the explanation's content words — 4+ letters, not the mentions' —
    are words of the article)."""
    art = words(article)
    exp = words(explanation)
    grams = {tuple(art[i:i + min_quote]) for i in range(len(art) - min_quote + 1)}
    if any(tuple(exp[i:i + min_quote]) in grams for i in range(len(exp) - min_quote + 1)):
        return True
    named = {w for m in mentions for w in words(m)}
    content = [w for w in exp if len(w) >= 4 and w not in named]
    if len(content) < 3:
        return False
    vocab = set(art)
    return sum(w in vocab for w in content) / len(content) >= min_share


def check(explanation: str, doc: dict, pair: dict) -> dict[str, bool]:
    """{"person", "place", "grounded"} for one pair's explanation."""
    pers, loc = list(pair.get("pers_mentions_list") or []), list(pair.get("loc_mentions_list") or [])
    return {"person": names(explanation, pers), "place": names(explanation, loc),
            "grounded": grounded(explanation, doc.get("text") or "", pers + loc)}
