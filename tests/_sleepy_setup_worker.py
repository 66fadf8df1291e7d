"""A worker class set up ahead whose setup() first sleeps (waiting on a
file, say), then computes for a while: a spare made for it at SCHED_IDLE is
blocked when it is first looked at and starved later (test_priority)."""

from __future__ import annotations

import os
import time

from worker import Worker, rpc


def _sleep_then_compute(sleep: float) -> None:
    time.sleep(sleep)
    end = time.thread_time() + 0.3  # CPU time: a starved spare never gets there
    while time.thread_time() < end:
        pass


class SleepThenCompute(Worker):
    setup_ahead = True

    def setup(self) -> None:
        _sleep_then_compute(0.2)
        self.ready = True

    @rpc
    def ping(self) -> int:
        return 1


class SleepLongThenCompute(Worker):
    """The same, asleep for longer than the broker's looks last (the test
    shortens them, ``broker._zygote._CHECK_FOR``). The setup() that finds
    the file named by $PRIVSEP_TEST_FIRST removes it, sleeps a little and
    returns: the first spawn, set up on request, leaves the CPU free for the
    zygote to make the next spare (at SCHED_IDLE), and that spare is the one
    that sleeps long, then computes."""

    setup_ahead = True

    def setup(self) -> None:
        try:
            os.unlink(os.environ["PRIVSEP_TEST_FIRST"])
            time.sleep(0.3)
            return
        except (KeyError, FileNotFoundError):
            pass
        _sleep_then_compute(1.0)
        self.ready = True

    @rpc
    def ping(self) -> int:
        return 1
