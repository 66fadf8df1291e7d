"""A worker class whose module takes a second to import in the zygote itself
(a big library, say), not in the test process or in a spare: the zygote is
still importing it for the next spare when the test looks (test_priority)."""

from __future__ import annotations

import time

from _in_zygote import in_the_zygote

from worker import Worker, rpc

if in_the_zygote():
    time.sleep(1.0)


class SlowToImport(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"
