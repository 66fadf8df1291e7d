"""What the tests, conftest and the tests' worker modules share. It imports
neither pytest nor a test module: a zygote imports a worker's module, and
each broker's zygote that imported pytest took 0.3-0.5 s more to start."""

from __future__ import annotations

import os
import threading
import time

from protocol import Rights
from worker import Worker, rpc

READ = Rights.READ | Rights.FSTAT | Rights.SEEK


def close_later(fds: list[int], seconds: float) -> None:
    """Close ``fds`` from a thread ``seconds`` from now (a worker keeping
    copies of its outputs' write ends past its answer)."""

    def run() -> None:
        time.sleep(seconds)
        for fd in fds:
            os.close(fd)

    threading.Thread(target=run, daemon=True).start()


class Witness(Worker):
    """The shared broker's own worker (conftest's ``ro_broker``)."""

    @rpc
    def ping(self) -> str:
        return "pong"
