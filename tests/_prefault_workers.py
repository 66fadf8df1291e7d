"""The worker classes of test_prefault.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import os

from worker import Worker, rpc


class Starter(Worker):
    """A setup() of its own and no promise about it: set up on request."""

    def setup(self) -> None:
        self.ready = True

    @rpc
    def ping(self) -> str:
        return "pong"


class Flaky(Starter):
    """Its setup() fails while the file named by the environment exists."""

    def setup(self) -> None:
        if os.path.exists(os.environ.get("PRIVSEP_TEST_FAIL_SETUP", "/nonexistent")):
            raise RuntimeError("told to fail")
