"""The worker classes of test_zygote.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from worker import Worker, rpc
from worker._serve import CHANNEL_FD


class Echo(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def where(self) -> int:
        return os.getpid()


class Appender(Echo):
    @rpc
    def append(self, f: Any, data: bytes) -> int:
        return int(f.write(data))


class Flags(Echo):
    @rpc
    def flags(self) -> list[Any]:
        return [sys.flags.optimize, sys.flags.dev_mode, sys.flags.no_user_site, sys.flags.safe_path]


class Quitter(Echo):
    @rpc
    def quit(self, code: int) -> None:
        os._exit(code)


class Alarmed(Echo):
    @rpc
    def alarm_goes_off(self) -> list[Any]:
        """A worker bounding its own work with an interval timer (as parsers do)."""
        fired: list[int] = []
        signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        deadline = time.monotonic() + 2
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        return [bool(fired), sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, ()))]

    @rpc
    def sigchld(self) -> int:
        return int(signal.getsignal(signal.SIGCHLD))  # type: ignore[arg-type]  # (SIGCHLD's is never a handler here)


class EchoWithSetup(Echo):
    """A setup() of its own and no promise about it: never made ahead."""

    def setup(self) -> None:
        self.set_up_in = os.getpid()


class Eager(Echo):
    setup_ahead = True

    def setup(self) -> None:
        self.set_up_at = time.monotonic()

    @rpc
    def when_set_up(self) -> float:
        return self.set_up_at


class SlowAhead(Echo):
    setup_ahead = True

    def setup(self) -> None:
        time.sleep(1.5)  # a model to load, say


class FailsAhead(Worker):
    setup_ahead = True

    def setup(self) -> None:
        raise RuntimeError("the model file is missing")


class Environ(Echo):
    def setup(self) -> None:
        self.at_setup = dict(os.environ)

    @rpc
    def environ(self) -> dict[str, Any]:
        return {"setup": self.at_setup, "serving": dict(os.environ)}


class Snoop(Worker):
    """A compromised worker looking for the buffers in which the zygote it
    was forked from receives the broker's messages."""

    @rpc
    def snoop(self) -> dict[str, int]:
        import gc

        from protocol._wire import Channel

        # The zygote's loop that forked this process is still on its stack (and
        # its objects are frozen out of gc.get_objects()): look there too.
        candidates: list[object] = list(gc.get_objects())
        frame = sys._getframe()
        while frame is not None:
            for value in frame.f_locals.values():
                candidates.append(value)
                if isinstance(value, (list, tuple)):
                    candidates.extend(value)
            frame = frame.f_back  # type: ignore[assignment]
        channels = {id(c): c for c in candidates if type(c) is Channel and c.fileno() != CHANNEL_FD}
        found = readable = nonzero = 0
        for obj in channels.values():
            found += 1
            try:
                buf = obj._buf
                data = buf[:]
            except ValueError:  # unmapped
                continue
            readable += 1
            nonzero += len(data) - data.count(0)
            buf[:] = b"\xc1" * len(buf)  # never a msgpack first byte: a zygote reading it would die
        return {"found": found, "readable": readable, "nonzero": nonzero}
