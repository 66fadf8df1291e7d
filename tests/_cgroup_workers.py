"""The worker classes of test_cgroup.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import os

from worker import Worker, rpc

BALLAST = 24 << 20  # what setup() below writes: well above what a worker's own start touches


class Eater(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def eat(self, mib: int) -> int:
        block = b"\x01" * (mib << 20)  # every page written: charged, not just reserved
        return len(block)

    @rpc
    def where(self) -> int:
        return os.getpid()


class Ballast(Eater):
    """A setup() of its own: its spare gets the request first, then runs it."""

    def setup(self) -> None:
        self.ballast = b"\x01" * BALLAST


class BallastAhead(Ballast):
    setup_ahead = True  # its spare runs setup() while it waits
