"""glotkit's one voice.  Library code logs through a ``log`` function it is handed (tests hand
``list.append``); the messages carry no prefix of their own.  :func:`say` is the default
``log``: it adds the prefix and writes the line to standard error, so every line glotkit
prints starts the same way."""

from __future__ import annotations

import sys
from typing import Callable

PREFIX = "[glotkit]"


def say(msg: str) -> None:
    """Print one message, prefixed, on standard error."""
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def prefixed(write: Callable[[str], None]) -> Callable[[str], None]:
    """A log function that hands ``write`` each message with the prefix (e.g. a trial's log file)."""
    return lambda msg: write(f"{PREFIX} {msg}")
