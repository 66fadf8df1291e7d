"""A worker's ``print()``: nowhere, or to the broker's log.

A worker's fds 0-2 are ``/dev/null`` (a compromised worker must not write to
the broker's terminal). ``sys.stdout`` and ``sys.stderr`` are :class:`Output`
streams. By default what they are given goes nowhere, in bounded memory.
When the broker asks for it (``Broker(worker_output=True)``, a ``cfg``
message right after the worker is ready), each line travels to the broker
as an ``out`` message while a call runs; the broker logs it on the
``privsep.worker`` logger. Lines written between calls (in ``setup()``, by a
thread of the worker's own) wait for the next call, at most
``MAX_PENDING`` characters; the rest is dropped and counted.
"""

from __future__ import annotations

import codecs
import io
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import BrokerClient

MAX_LINE = 4096  # characters in one out message (a longer line travels in pieces)
MAX_PENDING = 64 * 1024  # characters waiting for a call, at most
STREAMS = ("stdout", "stderr")


class _Hub:
    """The lines of both streams, in the order written, and where they go."""

    def __init__(self) -> None:
        self.forward: bool | None = None  # None until the broker says (cfg) or the first call comes
        self.client: BrokerClient | None = None
        # This state (sending takes the client's lock instead). Re-entrant: a finalizer that prints
        # may run, on collection, in the middle of a write.
        self._lock = threading.RLock()
        self._lines: deque[tuple[str, str]] = deque()
        self._size = 0
        self._dropped = 0
        self._partial = dict.fromkeys(STREAMS, "")

    def write(self, stream: str, text: str) -> None:
        if self.forward is False:
            return
        with self._lock:
            text = self._partial[stream] + text
            *lines, rest = text.split("\n")
            while len(rest) > MAX_LINE:
                lines.append(rest[:MAX_LINE])
                rest = rest[MAX_LINE:]
            self._partial[stream] = rest
            for line in lines:
                self._queue(stream, line)
        if self.forward:
            self.send()

    def flush(self, streams: tuple[str, ...] = STREAMS) -> None:
        """A line begun and not ended (``print(..., end="")``) goes as it is:
        on ``flush()``, and when the call ends."""
        if self.forward is False:
            return
        with self._lock:
            for stream in streams:
                if self._partial[stream]:
                    self._queue(stream, self._partial[stream])
                    self._partial[stream] = ""
        if self.forward:
            self.send()

    def _queue(self, stream: str, line: str) -> None:  # (holding self._lock)
        for start in range(0, max(1, len(line)), MAX_LINE):
            piece = line[start:start + MAX_LINE]
            if self._size + len(piece) > MAX_PENDING:
                self._dropped += len(piece)
            else:
                self._lines.append((stream, piece))
                self._size += len(piece)

    def send(self, *, block: bool = False) -> None:
        """Send the waiting lines if a call runs and the channel is free
        (``block``: wait for it, as the end of a call does). A write from
        within a request (a finalizer, a signal handler) leaves them waiting."""
        client = self.client
        if not self.forward or client is None or not client._in_call or not (self._lines or self._dropped):
            return
        if not client._lock.acquire(blocking=block):
            return
        try:
            with self._lock:
                lines, self._lines = self._lines, deque()
                dropped, self._dropped, self._size = self._dropped, 0, 0
            if dropped:
                lines.append(("stderr", f"[privsep: {dropped} characters of output dropped while no call ran]"))
            for stream, text in lines:
                client._chan.send({"t": "out", "s": stream, "x": text})
        except (OSError, ValueError):
            pass  # the broker is gone or the channel shut: a print must not raise for it
        finally:
            client._lock.release()

    def configure(self, forward: bool) -> None:
        """What the broker asked for (or, at the first call without asking, not to)."""
        self.forward = forward
        if not forward:
            with self._lock:
                self._lines.clear()
                self._size = self._dropped = 0
                self._partial = dict.fromkeys(STREAMS, "")


hub = _Hub()


class _Bytes(io.RawIOBase):
    """``sys.stdout.buffer``: bytes written there join the same lines (UTF-8)."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name
        self._decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = memoryview(b).tobytes()
        hub.write(self._name, self._decoder.decode(data))
        return len(data)


class Output(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` of a worker (see the module's doc)."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name
        self.buffer = _Bytes(name)  # for code that writes bytes; unbuffered, so lines keep their order

    @property
    def name(self) -> str:
        return f"<{self._name}>"

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        hub.write(self._name, s)
        return len(s)

    def flush(self) -> None:
        hub.flush((self._name,))
