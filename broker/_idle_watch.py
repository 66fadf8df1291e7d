"""Sandbox notifications and deaths of workers no call is waiting on.

A call waits on its worker's seccomp listener and ends the worker at its
first forbidden syscall. Between calls nobody did: a thread of a worker that
made one after its call had answered stayed blocked, unreported and alive
(no audit event; a ``stop()`` recorded an ``ok`` end, or the next call,
another task's in a pool, took the blame; red-team round 39). One thread per
process watches every worker's listener while there are workers, and hands a
notification to its handle, which ends the worker (or answers EPERM) as a
call would, if no call holds it; a call that does sees it itself, or the
watch asks again once the call has let go. It watches each worker's pidfd
too: a worker that died while idle (killed from outside, the OOM killer, a
thread of its own that exited) had its end recorded, logged and counted by
its pool only at its next call, stop or kill; now at once, by its handle.

The watch polls the handles' own fds and never reads, answers or closes
one: a handle takes its fds off the watch before closing them, and the
handle re-checks its own fd under its call lock before acting, so an event
for a number closed and reused meanwhile (a handle dropped unclosed) costs
one spurious wake-up, nothing else. Its wake-up pipe is the process's for
good (made at import, with the epoll set below; in a forked child, anew at
its first watch): a thread that closed it when idle could close it under
its own poll, and a dropped broker would lose two fds.

It also runs the odd short check at a set time (``call_at``): a zygote
lowered to SCHED_IDLE to make a spare must be raised again from outside if
the CPUs never fall idle (see ``broker._zygote``), and this thread is there
whenever workers are.

A spawn adds two fds, cancels a timer and sets one: waking the thread for
each, to poll anew, cost a spawn and its first call about 1 ms here (the
thread took the GIL on another CPU each time; spawn plus first call 3.7-3.8
ms, now 2.6-2.8). So a new fd goes into an epoll set that the thread's poll
includes, which sees it at once with no wake-up; the thread moves it into
its own poll set at its next turn (the epoll set's readiness is one), so an
event is still checked against the fd it polled. A timer wakes the thread
only if its time comes before the thread's own wake-up; a cancel never
(``settle()`` does, for the thread to end). An ``unwatch`` always wakes it:
a closed fd it still polled stays open in the kernel until its poll returns
(a listener so kept makes the worker's next forbidden syscall wait instead
of failing).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from ._loop import drain, poke

log = logging.getLogger("privsep.broker")
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class _Watched(Protocol):
    def _idle_notification(self) -> float | None: ...
    def _idle_exit(self) -> float | None: ...


class _Entry:
    """A watched fd: its handle, and whether it is the pidfd (readable for
    good once the process has ended) or the listener."""

    __slots__ = ("pidfd", "ref")

    def __init__(self, handle: _Watched, pidfd: bool) -> None:
        self.ref = weakref.ref(handle)
        self.pidfd = pidfd


class _Timer:
    __slots__ = ("fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when, self.fn = when, fn


class IdleWatch:
    """One thread, started with the first watch (or timer) and ending with
    the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, _Entry] = {}  # fd -> its handle
        self._timers: list[_Timer] = []  # (a few: one per zygote at most)
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pending = _new_epoll()  # fds watched since the thread last looked (None: wake it instead)
        self._pending_fds: set[int] = set()
        self._sleeps_until = math.inf  # when the thread's wait ends by itself (under the lock)

    def after_fork_in_child(self) -> None:
        """The thread did not come along, and the workers are the parent's;
        the pipe is shared with the parent, whose wake-ups a read here would
        take. (A new one is made at the child's first watch: a forked worker
        keeps no fd of ours.)"""
        self._lock = threading.Lock()
        self._watched = {}
        self._timers = []  # (the parent's zygotes)
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._pending is not None:
            self._pending.close()
        self._pending, self._pending_fds = None, set()
        self._sleeps_until = math.inf

    def watch(self, fd: int, handle: _Watched, *, pidfd: bool = False) -> None:
        """Watch ``fd``, the handle's own listener (or its pidfd), until
        ``unwatch``: call that before closing it."""
        with self._lock:
            self._watched[fd] = _Entry(handle, pidfd)
            if self._thread is not None and self._pend(fd):
                return  # (seen through the epoll set: no wake-up)
            self._run_or_wake()

    def _pend(self, fd: int) -> bool:  # (holding the lock)
        """Add ``fd`` to the epoll set the thread polls; False if there is none."""
        if self._pending is None:
            return False
        try:
            if fd in self._pending_fds:
                self._pending.modify(fd, select.EPOLLIN)
            else:
                self._pending.register(fd, select.EPOLLIN)
        except OSError:  # (the number's earlier file, closed unwatched: a new file now)
            with contextlib.suppress(OSError):
                self._pending.unregister(fd)
            try:
                self._pending.register(fd, select.EPOLLIN)
            except OSError:
                return False
        self._pending_fds.add(fd)
        return True

    def _unpend(self, fd: int) -> None:  # (holding the lock)
        if fd in self._pending_fds:
            self._pending_fds.discard(fd)
            if self._pending is not None:
                with contextlib.suppress(OSError):  # (closed unwatched: the kernel dropped it)
                    self._pending.unregister(fd)

    def unwatch(self, fd: int) -> None:
        with self._lock:
            self._unpend(fd)
            if self._watched.pop(fd, None) is not None:
                self._wake()

    def call_at(self, when: float, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` on the watch's thread once ``time.monotonic()`` has
        reached ``when``; returns what cancels it. ``fn`` must be short and
        never wait: the watch waits for it. (Its exceptions are logged.) It
        is held until then: what it refers to strongly lives as long."""
        timer = _Timer(when, fn)
        with self._lock:
            self._timers.append(timer)
            if self._thread is None or when < self._sleeps_until:
                self._run_or_wake()

        def cancel() -> None:
            # No wake-up (a spawn cancels one): the thread wakes at that time for nothing, or
            # settle() wakes it to end.
            with self._lock:
                if timer in self._timers:
                    self._timers.remove(timer)

        return cancel

    def settle(self, timeout: float) -> None:
        """If nothing is watched and no timer is set any more, wait (at most
        ``timeout`` seconds) for the thread to end, as a broker's close()
        waits for its own threads: a program that closed its brokers has
        none left."""
        with self._lock:
            thread = self._thread if not self._watched and not self._timers else None
            if thread is not None:
                self._wake()  # (it may be waiting for a cancelled timer's time)
        if thread is not None:
            thread.join(timeout)

    def _run_or_wake(self) -> None:  # (holding the lock)
        if self._wake_r < 0:  # (a forked child's first watch)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._pending = _new_epoll()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="privsep-idle-watch", daemon=True)
            self._thread.start()
        else:
            self._wake()

    def _wake(self) -> None:  # (holding the lock)
        poke(self._wake_w)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # (a bug: said; the next watch starts a new thread)
            log.exception("privsep idle-watch thread failed")
            with self._lock:
                self._watched.clear()
                self._timers.clear()
                self._thread = None

    def _serve(self) -> None:
        # Listeners to look at again at a time, not polled meanwhile (a level-triggered poll would
        # spin): notified while a call held the handle, or an errno answer held back (its rates);
        # a process ended while a call held the handle.
        later: dict[int, tuple[float, _Entry]] = {}
        while True:
            with self._lock:
                if not self._watched and not self._timers:
                    self._thread = None
                    self._sleeps_until = math.inf
                    return
                for fd in self._pending_fds:  # (polled below from now on, as the fd it is now)
                    if self._pending is not None:
                        with contextlib.suppress(OSError):
                            self._pending.unregister(fd)
                self._pending_fds.clear()
                watched = dict(self._watched)
                wake = self._wake_r
                pending = -1 if self._pending is None else self._pending.fileno()
                for fd in list(later):
                    if watched.get(fd) is not later[fd][1]:
                        del later[fd]  # (unwatched, or its number now another worker's)
                times = [t.when for t in self._timers] + [when for when, _ in later.values()]
                self._sleeps_until = min(times, default=math.inf)
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            if pending >= 0:
                poller.register(pending, select.POLLIN)
            for fd in watched:
                if fd not in later:
                    poller.register(fd, select.POLLIN)
            timeout = None
            if times:
                timeout = max(0, math.ceil((min(times) - time.monotonic()) * 1000))
            events = poller.poll(timeout)
            with self._lock:
                self._sleeps_until = -math.inf  # (running: it looks at the timers again before it waits)
            now = time.monotonic()
            self._run_timers(now)
            events += [(fd, select.POLLIN) for fd, (when, _) in later.items() if when <= now]
            for fd, ev in events:
                if fd == wake:
                    drain(wake)
                    continue
                if fd == pending:
                    continue  # (a new fd has an event: polled itself at the next turn)
                later.pop(fd, None)
                with self._lock:
                    entry = self._watched.get(fd)
                if entry is None or entry is not watched.get(fd):
                    # Unwatched meanwhile; or its number closed and now another worker's, who has
                    # not been polled yet: the event was the old fd's. Given to the new one, it
                    # read a fresh worker as ended, and the look at its end killed it.
                    continue
                handle = entry.ref()
                if handle is None:  # (dropped unclosed: its fd closed, not unwatched)
                    self._forget(fd, entry)
                    continue
                if entry.pidfd:
                    again = handle._idle_exit()
                    del handle
                    if again is not None:
                        later[fd] = (again, entry)
                    else:  # (recorded: its handle unwatched it; or a stop or kill records it)
                        self._forget(fd, entry)
                    continue
                if ev & _GONE and not ev & select.POLLIN:
                    # Hung up: no task of the worker is left to make a syscall (or an fd closed
                    # without unwatch). Polled on, it would wake every poll.
                    self._forget(fd, entry)
                    continue
                again = handle._idle_notification()
                del handle
                if again is not None:
                    later[fd] = (again, entry)

    def _run_timers(self, now: float) -> None:
        with self._lock:
            due = [t for t in self._timers if t.when <= now]
            if not due:
                return
            self._timers = [t for t in self._timers if t.when > now]
        for timer in due:
            try:
                timer.fn()
            except Exception:  # (a bug: said, and the watch goes on)
                log.exception("privsep idle-watch timer failed")

    def _forget(self, fd: int, entry: _Entry) -> None:
        with self._lock:
            if self._watched.get(fd) is entry:
                del self._watched[fd]


def _new_epoll() -> select.epoll | None:
    return select.epoll(sizehint=8, flags=select.EPOLL_CLOEXEC) if hasattr(select, "epoll") else None


#: The process's watch, shared by its brokers.
idle_watch = IdleWatch()
os.register_at_fork(after_in_child=idle_watch.after_fork_in_child)
