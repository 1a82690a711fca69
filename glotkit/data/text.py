"""Text fixes that data readers and metrics share."""

from __future__ import annotations

_RO_CEDILLA = str.maketrans({"ş": "ș", "Ş": "Ș", "ţ": "ț", "Ţ": "Ț"})


def fix_romanian_diacritics(text: str) -> str:
    """ş/ţ with cedilla -> ș/ț with comma below (also the upper-case forms)."""
    return text.translate(_RO_CEDILLA)
