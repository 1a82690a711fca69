"""Language-aware answer normalization for EM/F1.

The official SQuAD v1.1 script lower-cases, removes ASCII punctuation and the English articles
*a, an, the*, and squeezes whitespace.  Applied to other languages it is wrong twice: it keeps
Unicode punctuation (« » „ ” – …) and it removes English words that may be real words elsewhere.
Here:

* Unicode NFC first, so composed and decomposed letters compare equal;
* Romanian: the legacy cedilla letters ş Ş ţ Ţ (U+015F/015E/0163/0162), still common in web
  text and in older data sets, become the correct comma-below ș Ș ț Ț (U+0219/0218/021B/021A);
* case folded (``str.casefold``);
* every Unicode punctuation character (categories P*) and the ASCII symbols the official script
  removes are dropped;
* articles are removed only for English (Romanian articles are suffixes and cannot be split off);
* whitespace squeezed.

For English text containing only ASCII this equals the official script exactly (a test checks).
"""

from __future__ import annotations

import re
import string
import unicodedata

from glotkit.data.text import fix_romanian_diacritics

_ASCII_PUNCT = set(string.punctuation)
_EN_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
# languages whose legacy cedilla letters mean the comma-below ones (not Turkish, where ş is right)
_CEDILLA_LANGS = {"ro", "ron", "rum", "mo", "mol"}


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str, language: str = "ro") -> str:
    """Normalize an answer for comparison, as described in the module docstring."""
    lang = (language or "").lower().split("-")[0].split("_")[0]
    text = unicodedata.normalize("NFC", text)
    if lang in _CEDILLA_LANGS:
        text = fix_romanian_diacritics(text)
    text = text.casefold()
    text = "".join(ch for ch in text if not _is_punct(ch))
    if lang == "en":
        text = _EN_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def raw_answer(text: str) -> str:
    """The 'raw' view: only surrounding whitespace removed; nothing else forgiven."""
    return text.strip()
