"""Worker-supplied text in privsep's own log lines.

A path a worker asks for, or the message of an exception it raises, may
hold a newline: put in a log line as it is, it would start a line of the
worker's making (a forged ``granted`` in the audit log, say). Log
messages carry such text escaped; ``record.privsep`` keeps it as it was.
"""

from __future__ import annotations

import reprlib

#: Worker text longer than this is cut in log lines and log records: a
#: message may carry 64 MiB of it, which escaping and every handler would
#: otherwise pay for (a path is refused past 4096 bytes anyway).
MAX_LOGGED = 4096


def bounded(text: str, limit: int = MAX_LOGGED) -> str:
    """``text``, cut to ``limit`` characters and saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


def printable(text: str) -> str:
    """``text`` (cut by :func:`bounded`) with every character
    ``str.isprintable`` refuses (controls, line and paragraph separators,
    bidirectional overrides, ...) escaped as Python writes it (``\\n``,
    ``\\x1b``, ``\\u2028``), and every backslash doubled, so no escape can
    be forged either: a name holding a backslash and an ``n`` read the same
    as one holding a newline while only the newline was escaped (red-team
    round 37). Text with neither is left as it is."""
    text = bounded(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


class _ShortRepr(reprlib.Repr):
    """Reprs of what a worker sent as a path, made from at most a few KiB of
    it at any depth (a bytes or list of 64 MiB would be repr'd whole first)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = MAX_LOGGED
        self.maxlist = self.maxtuple = self.maxdict = 16

    def repr_bytes(self, value: bytes, level: int) -> str:
        if len(value) <= MAX_LOGGED:
            return repr(value)
        return f"{value[:MAX_LOGGED]!r}...[bytes of {len(value)}]"


#: A repr of any value a worker sent, built from a few KiB of it.
short_repr = _ShortRepr().repr
