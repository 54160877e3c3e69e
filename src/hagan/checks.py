"""Small checks shared by the command line, the config and the files of runs and caches.

Every message that echoes a user value goes through :func:`short_repr`, so a huge or deeply nested
value (a YAML alias bomb, a megabyte string) still gives one short line, in time and memory bounded
by the limit rather than by the value.
"""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (``...`` marks a cut); visits a bounded
    number of elements, so an exponentially large value costs no more than a small one."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_text(text: str, limit: int = 120) -> str:
    """The first line of ``text``, control characters escaped, cut to at most ``limit`` characters
    (``...`` marks a cut)."""
    lines = text[: limit + 1].splitlines() or [""]
    cut = len(lines) > 1 or len(text) > limit
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in lines[0])
    if cut or len(line) > limit:
        line = line[: limit - 3] + "..."
    return line
