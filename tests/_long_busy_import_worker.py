"""A worker class whose module computes for 10 s when the zygote imports it
(a big library's import-time work, say): the zygote stays busy, runnable,
for that long, whatever its priority (test_priority)."""

from __future__ import annotations

import time

from _in_zygote import in_the_zygote

from worker import Worker, rpc

if in_the_zygote():
    _until = time.monotonic() + 10.0
    while time.monotonic() < _until:
        pass


class LongBusyToImport(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"
