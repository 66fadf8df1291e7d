"""The broker's background thread: reaping an event loop must not wait for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

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
