"""The thread every process the broker starts is started from.

The kernel sends a child's parent-death signal (``PR_SET_PDEATHSIG``) when
the *thread* that forked it ends, not its process. A worker, zygote or
opener started from a pool's thread, an executor's, or the thread
``Broker.astart()`` runs on would be killed when that thread ended, so such
children went without the signal and ended only at EOF on their channel
when the broker died: a forked worker busy in a parse never read it and ran
on, an orphan. Every child is now started from a thread that lives as long
as the process: the main thread (directly, when it asks), or else one
daemon thread of this module's, started once per process. Its children
get the signal, and get it only when the broker's process dies.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class _ParentThread:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="privsep-parent", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.set_result(job())
            except BaseException as exc:  # the caller's to see (never this thread's end)
                done.set_exception(exc)
            del job, done  # (nothing of a start kept alive here until the next one)

    def run(self, job: Callable[[], T]) -> T:
        done: Future[T] = Future()
        self._jobs.put((job, done))
        return done.result()


_lock = threading.Lock()
_parent: _ParentThread | None = None


def _forget() -> None:
    """In a forked copy of this process: the thread was not copied."""
    global _parent, _lock
    _parent = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget)


def lives_with_process() -> bool:
    """Does this thread live as long as its process (a child it starts may
    take the parent-death signal)?"""
    if threading.current_thread() is threading.main_thread():
        return True
    parent = _parent
    return parent is not None and threading.current_thread() is parent.thread


def as_parent(start: Callable[[], T]) -> T:
    """Run ``start`` (which forks or spawns a child) on a thread that lives
    as long as this process, waiting for it; its result or exception is the
    caller's. Takes a moment's hop only from a thread that may end sooner."""
    global _parent
    if lives_with_process():
        return start()
    with _lock:
        if _parent is None:
            _parent = _ParentThread()
        parent = _parent
    return parent.run(start)
