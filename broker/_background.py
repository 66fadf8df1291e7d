"""Work a call on an event loop must not wait for, done on a thread.

The kernel takes a while to tear a big process down (about 70 ms a GiB
here), and a memory cgroup can be removed only once its process has gone.
A worker killed during an awaited call is recorded at once; waiting for it,
reaping it and removing its cgroup happen here, so that the loop runs on.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from ._loop import drain, poke

log = logging.getLogger("privsep.broker")
_OFFLOAD_THREADS = 4
_T = TypeVar("_T")


class _OneShot(ThreadPoolExecutor):
    """An executor whose thread ends once the work submitted to it is done
    (shut down as it is submitted): for work asked of a closed broker."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        fut = super().submit(fn, *args, **kwargs)
        self.shutdown(wait=False)
        return fut


class Background:
    """One thread, started when there is work and ending when there is none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._after_exit: dict[int, Callable[[], None]] = {}  # pidfd -> what to do once its process ended
        self._soon: list[Callable[[], None]] = []
        self._wake_r = self._wake_w = -1  # (open while the thread runs)
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._status: ThreadPoolExecutor | None = None
        self._shut = False  # shutdown() was called: the broker is closed

    def after_exit(self, pidfd: int, then: Callable[[], None]) -> None:
        """Run ``then`` once the process of ``pidfd`` has ended. Takes
        ownership of ``pidfd`` (closed after ``then``)."""
        with self._lock:
            self._after_exit[pidfd] = then
            self._start()

    def soon(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the thread."""
        with self._lock:
            self._soon.append(work)
            self._start()

    def executor(self) -> ThreadPoolExecutor:
        """Threads for the work an awaited call waits for (a zygote's answer,
        a commit's copy, a listing, a big argument): the broker's own, never
        the loop's default executor, which the program may fill (a kill() run
        there waits for the call, which would wait for a free thread)."""
        with self._lock:
            if self._shut:
                return _OneShot(1, thread_name_prefix="privsep-offload")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(_OFFLOAD_THREADS, thread_name_prefix="privsep-offload")
            return self._executor

    def status_lane(self) -> ThreadPoolExecutor:
        """One thread for asking a zygote for exit statuses (one at a time
        anyway), apart from ``executor()``: a commit copying gigabytes there
        held an astop() a second (red-team round 22)."""
        with self._lock:
            if self._shut:
                return _OneShot(1, thread_name_prefix="privsep-status")
            if self._status is None:
                self._status = ThreadPoolExecutor(1, thread_name_prefix="privsep-status")
            return self._status

    def shutdown(self) -> None:
        """Let the executors' threads go once their work is done. Work asked
        for later (an aspawn() racing the close, to be refused) gets a thread
        that ends with it: a new executor kept here was never shut down, one
        thread left per closed broker (red-team round 31)."""
        with self._lock:
            self._shut = True
            executors = (self._executor, self._status)
            self._executor = self._status = None
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=False)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is left to do; False after ``timeout`` seconds."""
        with self._lock:
            return self._done.wait_for(lambda: self._thread is None, timeout)

    def forked_copy(self) -> None:
        """In a forked child: the thread did not come along, and the processes
        are the parent's. Forget them (their pidfds are this copy's to close)."""
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        for pidfd in self._after_exit:
            os.close(pidfd)
        self._after_exit.clear()
        self._soon.clear()
        self._thread = None
        self._executor = self._status = None  # (their threads did not come along)
        self._close_wake()

    def _start(self) -> None:  # (holding the lock)
        if self._thread is None:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._thread = threading.Thread(target=self._run, name="privsep-background", daemon=True)
            self._thread.start()
        else:
            poke(self._wake_w)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # (a bug: said; the next piece of work starts a new thread)
            log.exception("privsep background thread failed")
            with self._lock:
                self._thread = None
                self._close_wake()
                self._done.notify_all()

    def _serve(self) -> None:
        while True:
            with self._lock:
                soon, self._soon = self._soon, []
                waiting = list(self._after_exit)
                if not soon and not waiting:
                    self._thread = None
                    self._close_wake()
                    self._done.notify_all()
                    return
            for work in soon:
                self._do(work)
            if not waiting:
                continue
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for pidfd in waiting:
                poller.register(pidfd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    drain(self._wake_r)
                    continue
                with self._lock:
                    then = self._after_exit.pop(fd, None)
                if then is not None:
                    try:
                        self._do(then)
                    finally:
                        os.close(fd)

    def _close_wake(self) -> None:
        # Let go of the numbers first: os.close releases the GIL, and a fork of the process
        # meanwhile had the copy close them again (EBADF in its at-fork hook, or an fd of its
        # own that reused the number; red-team round 29).
        fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _do(work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # (a bug: said, and the thread goes on with the rest)
            log.exception("privsep background work failed")
