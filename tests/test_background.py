"""The broker's background thread: reaping an event loop must not wait for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

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
