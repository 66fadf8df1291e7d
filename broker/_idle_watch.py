"""Sandbox notifications of workers no call is waiting on.

A call waits on its worker's seccomp listener and ends the worker at its
first forbidden syscall. Between calls nobody did: a thread of a worker that
made one after its call had answered stayed blocked, unreported and alive
(no audit event; a ``stop()`` recorded an ``ok`` end, or the next call,
another task's in a pool, took the blame; red-team round 39). One thread per
broker watches every worker's listener while it has workers, and hands a
notification to its handle, which ends the worker (or answers EPERM) as a
call would, if no call holds it; a call that does sees it itself, or the
watch tries again once the call has let go.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
import weakref
from typing import Protocol

log = logging.getLogger("privsep.broker")
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class _Watched(Protocol):
    def _idle_notification(self) -> float | None: ...


class IdleWatch:
    """One thread, started with the first watch and ending with the last.
    Each watch holds a duplicate of the listener, owned here: the handle
    closes its own at the worker's end, and a number reused meanwhile must
    not be polled in its place. A watch ends when its listener hangs up (no
    task of the worker is left) or its handle is gone or has ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._watched: dict[int, weakref.ref[_Watched]] = {}  # our dup -> the handle
        self._unwatched: list[int] = []  # dups to close: by the thread, which may be polling them
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    def watch(self, listener: int, handle: _Watched) -> int:
        """Watch ``listener`` (not taken: a duplicate is) for ``handle``.
        Returns the watch's token, for ``unwatch``."""
        own = os.dup(listener)  # (close-on-exec, as os.dup makes it)
        with self._lock:
            self._watched[own] = weakref.ref(handle)
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._thread = threading.Thread(target=self._run, name="privsep-idle-watch", daemon=True)
                self._thread.start()
            else:
                self._wake()
        return own

    def unwatch(self, token: int) -> None:
        """End a watch (its worker ended). Its duplicate is closed by the
        thread, never under a poll of it: the number cannot be reused until
        the thread has let go of it."""
        with self._lock:
            if self._watched.pop(token, None) is not None:
                self._unwatched.append(token)
                self._wake()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the thread has ended (no watch left); False after ``timeout`` seconds."""
        with self._lock:
            return self._done.wait_for(lambda: self._thread is None, timeout)

    def forked_copy(self) -> None:
        """In a forked child: the thread did not come along, and the workers
        are the parent's. Close this copy's duplicates."""
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        for fd in [*self._watched, *self._unwatched]:
            os.close(fd)
        self._watched.clear()
        self._unwatched.clear()
        self._thread = None
        self._close_wake()

    def _wake(self) -> None:  # (holding the lock, the thread running)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # (woken already)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # (a bug: said; the next watch starts a new thread)
            log.exception("privsep idle-watch thread failed")
            with self._lock:
                for fd in [*self._watched, *self._unwatched]:
                    os.close(fd)
                self._watched.clear()
                self._unwatched.clear()
                self._thread = None
                self._close_wake()
                self._done.notify_all()

    def _serve(self) -> None:
        # Listeners to look at again at a time, not polled meanwhile (a level-triggered poll would
        # spin): notified while a call held the handle, or an errno answer held to the request rate.
        later: dict[int, float] = {}
        while True:
            with self._lock:
                for fd in self._unwatched:
                    later.pop(fd, None)
                    os.close(fd)
                self._unwatched.clear()
                if not self._watched:
                    self._thread = None
                    self._close_wake()
                    self._done.notify_all()
                    return
                watched = list(self._watched)
                wake = self._wake_r
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            for fd in watched:
                if fd not in later:
                    poller.register(fd, select.POLLIN)
            timeout = None if not later else max(0, math.ceil((min(later.values()) - time.monotonic()) * 1000))
            events = poller.poll(timeout)
            now = time.monotonic()
            events += [(fd, select.POLLIN) for fd, when in later.items() if when <= now]
            for fd, ev in events:
                if fd == wake:
                    self._drain_wake()
                    continue
                later.pop(fd, None)
                with self._lock:
                    ref = self._watched.get(fd)
                if ref is None:
                    continue  # unwatched meanwhile: closed at the top of the loop
                handle = ref()
                if handle is None or (ev & _GONE and not ev & select.POLLIN):
                    self.unwatch(fd)  # (no task of the worker left, or nobody holds its handle)
                    continue
                again = handle._idle_notification()
                del handle
                if again is not None:
                    later[fd] = again

    def _drain_wake(self) -> None:
        while True:
            try:
                if not os.read(self._wake_r, 64):
                    return
            except BlockingIOError:
                return

    def _close_wake(self) -> None:
        fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
        for fd in fds:
            if fd >= 0:
                os.close(fd)
