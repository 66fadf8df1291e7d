"""File descriptors the broker holds for its workers' requests, bounded.

Some answers keep a broker fd open after the request: a directory proxy
(until the worker closes it), a pipe a broker thread fills (until the worker
has read it), an output (until its call ends). A worker pays nothing for
them, so without a bound one worker could fill the broker's fd table and
every other worker's requests, and every spawn, would fail with EMFILE.
Each worker may hold its share, and all of them together half the broker's
``RLIMIT_NOFILE``: the other half stays free for the broker's own work. A
quarter of the budget is kept for workers' first ``MIN_SHARE`` fds: shares
are counted when fds are taken, so workers that took theirs while few others
ran keep them, and a worker that starts later still gets a first few.
"""

from __future__ import annotations

import resource
import threading
from typing import Protocol

from protocol import NotCapable

#: A worker's share never falls below this, however many workers there are.
MIN_SHARE = 8


class Holder(Protocol):
    _held: int


def broker_fd_limit() -> int:
    """Half the broker's soft RLIMIT_NOFILE (at least 64)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(64, soft // 2)


class FdBudget:
    """Counts and bounds the fds held for workers. Thread-safe: pump threads
    give theirs back when they end."""

    def __init__(self, per_worker: int | None, total: int | None = None):
        self.per_worker = per_worker  # the worker's own open-files limit: it holds no more through us
        self.total = broker_fd_limit() if total is None else total
        self.held = 0
        self._lock = threading.Lock()

    def share(self, live: int) -> int:
        """What one worker may hold while ``live`` workers run."""
        fair = max(MIN_SHARE, self.total // max(1, live))
        return fair if self.per_worker is None else min(self.per_worker, fair)

    def take(self, owner: Holder, n: int, what: str, live: int) -> None:
        """Count ``n`` more fds for ``owner``, or raise NotCapable (nothing counted)."""
        with self._lock:
            share = self.share(live)
            if owner._held + n > share:
                raise NotCapable(
                    f"{what} would hold more broker fds for this worker than its share of {share} "
                    f"(it holds {owner._held}, for pipes not read to their end, directories it asked for and "
                    "its call's outputs)"
                )
            if self.held + n > self.total:
                raise NotCapable(
                    f"{what} would hold more than {self.total} broker fds for its workers (half the "
                    f"broker's open-files limit; they hold {self.held})"
                )
            if owner._held + n > MIN_SHARE and self.held + n > self.total - self.total // 4:
                raise NotCapable(
                    f"{what} would take from the broker fds kept for other workers' first {MIN_SHARE} "
                    f"(its workers hold {self.held} of {self.total})"
                )
            owner._held += n
            self.held += n

    def give_back(self, owner: Holder, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            owner._held -= n
            self.held -= n


__all__ = ["FdBudget", "broker_fd_limit"]
