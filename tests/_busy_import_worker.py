"""A worker class whose module keeps a CPU busy for a while when the zygote
imports it (building a big table, say): the zygote making the next spare at
SCHED_IDLE runs all that time on a free CPU, and is not starved
(test_priority)."""

from __future__ import annotations

import time

from _in_zygote import in_the_zygote

from worker import Worker, rpc

if in_the_zygote():
    _end = time.monotonic() + 0.8
    while time.monotonic() < _end:
        pass


class BusyToImport(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"
