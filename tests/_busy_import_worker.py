"""A worker class whose module keeps a CPU busy for a while when the zygote
imports it (building a big table, say): the zygote making the next spare at
SCHED_IDLE runs all that time on a free CPU, and is not starved
(test_priority). ``PRIVSEP_TEST_BUSY_IMPORT`` in the broker's environment
sets how long, in seconds (default 0.8)."""

from __future__ import annotations

import os
import time

from _in_zygote import in_the_zygote

from worker import Worker, rpc

if in_the_zygote():
    _end = time.monotonic() + float(os.environ.get("PRIVSEP_TEST_BUSY_IMPORT", "0.8"))
    while time.monotonic() < _end:
        pass


class BusyToImport(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"
