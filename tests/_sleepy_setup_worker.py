"""A worker class set up ahead whose setup() first sleeps (waiting on a
file, say), then computes for a while: a spare made for it at SCHED_IDLE is
blocked when it is first looked at and starved later (test_priority)."""

from __future__ import annotations

import time

from worker import Worker, rpc


class SleepThenCompute(Worker):
    setup_ahead = True

    def setup(self) -> None:
        time.sleep(0.2)
        end = time.thread_time() + 0.3  # CPU time: a starved spare never gets there
        while time.thread_time() < end:
            pass
        self.ready = True

    @rpc
    def ping(self) -> int:
        return 1
