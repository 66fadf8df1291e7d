"""The broker's background thread: reaping an event loop must not wait for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from conftest import open_fds

from broker._background import Background


def test_work_runs_after_the_process_ends_and_nothing_is_left() -> None:
    before = open_fds()
    bg = Background()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    done: list[str] = []
    bg.after_exit(os.pidfd_open(proc.pid), lambda: done.append(f"reaped {proc.wait()}"))
    bg.soon(lambda: done.append("soon"))
    assert not bg.wait_idle(0.3)  # the process runs on: the work waits
    assert done == ["soon"]
    proc.send_signal(signal.SIGKILL)
    assert bg.wait_idle(10)
    assert done == ["soon", f"reaped {-signal.SIGKILL}"]
    assert not any(t.name == "privsep-background" for t in threading.enumerate())  # the thread ended
    assert open_fds() == before  # the pidfd and the wake-up pipe are closed


def test_a_failing_piece_of_work_is_logged_and_the_rest_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    bg = Background()
    done: list[int] = []

    def fail() -> None:
        raise RuntimeError("a bug")

    bg.soon(fail)
    bg.soon(lambda: done.append(1))
    assert bg.wait_idle(10) and done == [1]
    assert "privsep background work failed" in caplog.text


def test_the_idle_watch_runs_a_timer_on_its_thread_at_its_time_and_then_ends() -> None:
    from broker._idle_watch import IdleWatch

    watch = IdleWatch()
    ran: list[tuple[str, float, int]] = []
    t0 = time.monotonic()
    watch.call_at(t0 + 0.2, lambda: ran.append(("late", time.monotonic(), threading.get_ident())))
    watch.call_at(t0 + 0.05, lambda: ran.append(("soon", time.monotonic(), threading.get_ident())))
    cancel = watch.call_at(t0 + 0.1, lambda: ran.append(("cancelled", time.monotonic(), threading.get_ident())))
    cancel()
    thread = watch._thread
    assert thread is not None  # a timer alone keeps it: nothing is watched
    thread.join(5)
    assert not thread.is_alive() and watch._thread is None  # it ended after the last timer
    assert [name for name, _, _ in ran] == ["soon", "late"]
    assert ran[0][1] >= t0 + 0.05 and ran[1][1] >= t0 + 0.2
    assert {ident for _, _, ident in ran} == {thread.ident}


def test_a_cancelled_timer_lets_the_idle_watch_end_at_once() -> None:
    from broker._idle_watch import IdleWatch

    watch = IdleWatch()
    cancel = watch.call_at(time.monotonic() + 30, lambda: None)
    t0 = time.monotonic()
    cancel()
    watch.settle(5)
    assert watch._thread is None
    assert time.monotonic() - t0 < 1  # not held until the timer's time


def test_a_failing_timer_is_logged_and_the_watch_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    from broker._idle_watch import IdleWatch

    watch = IdleWatch()
    ran: list[str] = []

    def fail() -> None:
        raise RuntimeError("a bug")

    watch.call_at(time.monotonic(), fail)
    watch.call_at(time.monotonic() + 0.05, lambda: ran.append("next"))
    deadline = time.monotonic() + 5
    while watch._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == ["next"]
    assert "idle-watch timer failed" in caplog.text and "a bug" in caplog.text


class _Counting:
    """An IdleWatch whose wake-ups are counted."""

    def __new__(cls) -> Any:
        from broker._idle_watch import IdleWatch

        class Watch(IdleWatch):
            wakes = 0

            def _wake(self) -> None:
                type(self).wakes += 1
                super()._wake()

        return Watch()


class _Listener:
    """A stand-in handle: records the watch's looks at its "listener"."""

    def __init__(self) -> None:
        self.looked = threading.Event()

    def _idle_notification(self) -> float | None:
        self.looked.set()
        return None

    def _idle_exit(self) -> float | None:
        return None


def test_a_new_fd_is_watched_without_waking_the_thread_and_its_event_is_seen() -> None:
    """A spawn's two watches woke the thread each time (about 0.6 ms of a
    spawn and its first call here): a new fd now reaches the thread's poll
    through an epoll set it polls, with no wake-up."""
    watch = _Counting()
    first, second = os.pipe(), os.pipe()
    a, b = _Listener(), _Listener()
    try:
        watch.watch(first[0], a)  # starts the thread
        time.sleep(0.1)  # (waiting in its poll)
        woken = watch.wakes
        watch.watch(second[0], b)
        assert watch.wakes == woken
        time.sleep(0.05)
        assert not b.looked.is_set()
        os.write(second[1], b"x")  # readable: as a listener with a notification
        assert b.looked.wait(5), "the event on the fd watched without a wake-up was never seen"
        assert not a.looked.is_set()
        watch.unwatch(first[0])
        watch.unwatch(second[0])
        watch.settle(5)
        assert watch._thread is None
    finally:
        for fd in (*first, *second):
            os.close(fd)
        if watch._pending is not None:
            watch._pending.close()
        os.close(watch._wake_r)
        os.close(watch._wake_w)


def test_a_timer_wakes_the_thread_only_if_due_before_its_own_wake_up() -> None:
    watch = _Counting()
    r, w = os.pipe()
    try:
        watch.watch(r, _Listener())
        t0 = time.monotonic()
        ran: list[str] = []
        cancel_late = watch.call_at(t0 + 0.6, lambda: ran.append("late"))  # it waited for nothing: woken
        deadline = time.monotonic() + 5
        while watch._sleeps_until != t0 + 0.6 and time.monotonic() < deadline:
            time.sleep(0.005)  # (until it waits for that time)
        woken = watch.wakes
        watch.call_at(t0 + 0.8, lambda: ran.append("later"))  # after the thread's own wake-up: none
        assert watch.wakes == woken
        watch.call_at(t0 + 0.2, lambda: ran.append("soon"))  # before it: woken
        assert watch.wakes == woken + 1
        cancel_late()  # no wake-up: the thread wakes at its time for nothing
        assert watch.wakes == woken + 1
        deadline = time.monotonic() + 5
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ran == ["soon", "later"]
        watch.unwatch(r)
        watch.settle(5)
        assert watch._thread is None
    finally:
        os.close(r)
        os.close(w)
        if watch._pending is not None:
            watch._pending.close()
        os.close(watch._wake_r)
        os.close(watch._wake_w)
