"""The worker classes of test_priority.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import threading

from worker import Worker, rpc


class Echo(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"


class EchoWithSetup(Echo):
    """A setup() of its own and no promise about it: set up once asked."""

    def setup(self) -> None:
        self.ready = True


class Threaded(Echo):
    """Starts a thread in setup(), which runs ahead: only unsandboxed (sandbox
    entry needs a single thread)."""

    setup_ahead = True

    def setup(self) -> None:
        self.stop_helper = threading.Event()
        threading.Thread(target=self.stop_helper.wait, daemon=True).start()


class Spinner(Echo):
    @rpc
    def spin(self) -> None:
        """Busy until killed: a parse that never reads its channel."""
        while True:
            pass
