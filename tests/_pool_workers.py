"""The worker classes of test_pool.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import errno
import os
import time

from protocol import NotCapable
from worker import Worker, rpc


class Calc(Worker):
    @rpc
    def square(self, x: int) -> int:
        return x * x

    @rpc
    def pid(self) -> int:
        return os.getpid()

    @rpc
    def fail(self, msg: str) -> None:
        raise ValueError(msg)

    @rpc
    def die(self) -> None:
        os._exit(9)

    @rpc
    def sleep(self, t: float) -> float:
        time.sleep(t)
        return t

    @rpc
    def grow(self, mib: int) -> int:
        global _hoard
        _hoard = bytearray(mib << 20)
        for i in range(0, len(_hoard), 4096):
            _hoard[i] = 1
        return len(_hoard)


class Reader(Worker):
    """A pool worker holding a directory from its start (``grants``)."""

    @rpc
    def read(self, name: str) -> bytes:
        with self.grants["src"].open(name) as f:
            return f.read()

    @rpc
    def read_granted(self) -> bytes:
        return os.read(self.grants["f"].fileno(), 100)  # (no SEEK: no tell() of a buffered read)

    @rpc
    def listdir_raw(self) -> list[str]:
        """The directory's fd listed as it stands (os.listdir(fd) reads on
        from the fd's position), after moving it to the end."""
        fd = self.grants["src"].fileno()
        listed = sorted(os.listdir(fd))
        os.lseek(fd, 0, os.SEEK_END)
        return listed

    @rpc
    def escape(self) -> str:
        try:
            os.open("../secret", os.O_RDONLY, dir_fd=self.grants["src"].fileno())
        except OSError as exc:
            return errno.errorcode[exc.errno or 0]
        return "opened"

    @rpc
    def die(self) -> None:
        os._exit(9)

    @rpc
    def slow_read(self, name: str) -> bytes:
        time.sleep(0.2)  # (two at once take both slots)
        return self.read(name)


class BadSetup(Worker):
    def setup(self) -> None:
        raise RuntimeError("init failed")

    @rpc
    def ping(self) -> str:
        return "pong"


class Creator(Worker):
    @rpc
    def create(self, names: list[str]) -> list[str]:
        refused = []
        for name in names:
            try:
                with self.broker.create(f"out/{name}") as f:
                    f.write(b"x")
            except NotCapable:
                refused.append(name)
        return refused


class SlowStart(Worker):
    def setup(self) -> None:
        time.sleep(1.0)

    @rpc
    def nap(self, t: float) -> float:
        time.sleep(t)
        return t
