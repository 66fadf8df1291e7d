"""The broker's ends of its lifelines (see ``worker._lifeline``)."""

from __future__ import annotations

import os

from worker._lifeline import AVAILABLE


class Lifeline:
    """A lifeline pipe. Closing its write end (``close()``, this object's
    collection, or the broker's exit, however it ends) SIGKILLs every
    process armed on it, with its process group: close it only once they
    should die. The read end is what a child arms from: kept here for the
    children the broker starts itself (``read_end()``), or let go once the
    one child that needs it (a zygote) has it (``drop_read_end()``)."""

    __slots__ = ("_r", "_w")

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        # Read-only for its owner too: a worker without CAP_DAC_OVERRIDE that can reach its read
        # end through /proc (a sandbox without seccomp and namespaces) cannot reopen it to write,
        # which would kill every worker armed on it. Our write end was opened before.
        os.fchmod(self._w, 0o400)

    def read_end(self) -> int:
        return self._r

    def drop_read_end(self) -> None:
        r, self._r = self._r, -1
        if r >= 0:
            os.close(r)

    def close(self) -> None:
        self.drop_read_end()
        w, self._w = self._w, -1
        if w >= 0:
            os.close(w)

    def __del__(self) -> None:
        self.close()


def new_lifeline() -> Lifeline | None:
    """A new lifeline; None where there are none (not Linux)."""
    return Lifeline() if AVAILABLE else None
