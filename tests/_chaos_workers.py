"""The worker classes of test_chaos.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import time

from worker import Worker, rpc


class Chaos(Worker):
    @rpc
    def square(self, x: int) -> int:
        return x * x

    @rpc
    def nap(self, t: float) -> float:
        time.sleep(t)
        return t

    @rpc
    def fail(self) -> None:
        raise ValueError("as asked")
