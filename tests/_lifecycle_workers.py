"""The worker classes of test_lifecycle.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import os
import threading
import time
from typing import IO

from worker import Worker, rpc


class Sleeper(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    @rpc
    def exit_now(self, code: int) -> None:
        os._exit(code)

    @rpc
    def getpid(self) -> int:
        return os.getpid()


class Appender(Sleeper):
    @rpc
    def append(self, f: IO[bytes], data: bytes) -> int:
        f.seek(0, os.SEEK_END)
        return f.write(data)


class BadSetup(Worker):
    def setup(self) -> None:
        raise ImportError("no such module: nonexistent")

    @rpc
    def ping(self) -> str:
        return "pong"


class NeedsArgs(Worker):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    @rpc
    def ping(self) -> str:
        return "pong"


class SlowWriter(Worker):
    @rpc
    def write(self, name: str, seconds: float) -> None:
        time.sleep(seconds)
        with self.broker.create(f"out/{name}") as f:
            f.write(b"done")


class SlowSetup(Sleeper):
    def setup(self) -> None:
        time.sleep(0.5)


class Forking(Worker):
    @rpc
    def child(self) -> int:
        pid = os.fork()
        if pid == 0:
            while True:
                time.sleep(0.05)
        return pid

    @rpc
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Refuser(Worker):
    @rpc
    def refuse(self, f: IO[bytes]) -> None:
        raise ValueError("not this one")


class Ender(Sleeper):
    @rpc
    def exit_after(self, t: float, code: int) -> None:
        time.sleep(t)
        os._exit(code)


class SelfEnder(Sleeper):
    @rpc
    def exit_soon(self, code: int) -> None:
        """Exit with ``code`` a moment after this call has returned."""
        threading.Thread(target=lambda: (time.sleep(0.05), os._exit(code)), daemon=True).start()


class Farewell(Worker):
    @rpc
    def fail_unread(self, lines: bool) -> None:
        """Leave answers of the broker's unread, say why it fails (as its serve
        loop would) and exit, while the broker is held back by the request
        rate (2/s: the third request or line waits half a second)."""
        from protocol._remote import exception_to_wire

        chan = self.broker._chan
        req = {"t": "req", "op": "stat", "a": {"path": "data/a.txt"}}
        if lines:  # the broker next receives (its answer to the request unread): a reset
            chan.send({**req, "id": 1})
            chan.send({"t": "out", "s": "stdout", "x": "one"})
            chan.send({"t": "out", "s": "stdout", "x": "two"})
        else:  # the broker next sends (the third answer): that fails
            for i in (1, 2, 3):
                chan.send({**req, "id": i})
        chan.send({"t": "fail", "e": exception_to_wire(RuntimeError("out of luck"))})
        os._exit(70)


class Asker(Sleeper):
    @rpc
    def ask_forever(self) -> None:
        while True:
            self.broker.stat("data/a.txt")
