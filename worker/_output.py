"""A worker's ``print()``: nowhere, or to the broker's log.

A worker's fd 0 is ``/dev/null``, and fds 1 and 2 are pipes whose read ends
the worker itself holds (:func:`capture_stdio`): a compromised worker must
not write to the broker's terminal, and what C code writes there (a
library's warning, ``faulthandler``) must not be lost. ``sys.stdout`` and
``sys.stderr`` are :class:`Output` streams. By default what they are given
goes nowhere, in bounded memory, and at the first call fds 1 and 2 become
``/dev/null`` (until then a write past the pipe's 64 KiB fails with EAGAIN;
it never blocks). When the broker asks for it
(``Broker(worker_output=True)``, a ``cfg`` message right after the worker is
ready), each line travels to the broker as an ``out`` message while a call
runs; the broker logs it on the ``privsep.worker`` logger. The pipes are read
into the same lines when a call starts and ends and before each line Python
writes, so the two keep their order; between reads each holds 64 KiB (the
kernel's pipe size), and a write past that is cut short (or fails with
EAGAIN): the rest is lost.
What a worker writes as it dies (a fatal error) the broker reads from its
own copy of the stderr pipe's read end (sent in ``ready``). Lines written between
calls (in ``setup()``, by a thread of the worker's own) wait for the next
call, at most ``MAX_PENDING`` characters; the rest is dropped and counted.
"""

from __future__ import annotations

import codecs
import io
import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import BrokerClient

MAX_LINE = 4096  # characters in one out message (a longer line travels in pieces)
MAX_PENDING = 64 * 1024  # characters waiting for a call, at most
STREAMS = ("stdout", "stderr")
_STDIO_FDS = {"stdout": 1, "stderr": 2}
_DRAIN_MAX = 1 << 20  # bytes read from one pipe at a time, at most (a C thread may write without end)


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
        self.captured: dict[str, int] = {}  # stream -> the read end of the pipe on its fd (capture_stdio)
        self._raw_decoders = {name: codecs.getincrementaldecoder("utf-8")("backslashreplace") for name in STREAMS}

    def write(self, stream: str, text: str) -> None:
        if self.forward is False:
            return
        with self._lock:
            if self.captured and self.forward:
                self._drain()  # what C code wrote before this line goes first
            self._split(stream, text)
        if self.forward:
            self.send()

    def collect(self) -> None:
        """Read what was written to fds 1 and 2, and send what waits (a call starts)."""
        if self.forward:
            with self._lock:
                self._drain()
            self.send()

    def _drain(self) -> None:  # (holding self._lock)
        for stream, fd in self.captured.items():
            got = 0
            while got < _DRAIN_MAX:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EAGAIN: empty; anything else: nothing more to read from it
                    break
                if not data:
                    break
                got += len(data)
                self._split(stream, self._raw_decoders[stream].decode(data))

    def _split(self, stream: str, text: str) -> None:  # (holding self._lock)
        text = self._partial[stream] + text
        *lines, rest = text.split("\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial[stream] = rest
        for line in lines:
            self._queue(stream, line)

    def flush(self, streams: tuple[str, ...] = STREAMS) -> None:
        """A line begun and not ended (``print(..., end="")``) goes as it is:
        on ``flush()``, and when the call ends."""
        if self.forward is False:
            return
        with self._lock:
            if self.captured and self.forward:
                self._drain()
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
        """What the broker asked for (or, at the first call without asking, not to).
        Not to: fds 1 and 2 become fd 0's ``/dev/null`` (opened read-write), so
        that writes to them succeed and go nowhere, like those to sys.stdout."""
        self.forward = forward
        if not forward:
            with self._lock:
                for stream, fd in self.captured.items():
                    os.dup2(0, _STDIO_FDS[stream], inheritable=False)
                    os.close(fd)
                self.captured = {}
                self._lines.clear()
                self._size = self._dropped = 0
                self._partial = dict.fromkeys(STREAMS, "")


hub = _Hub()


def capture_stdio() -> None:
    """Make fds 1 and 2 the write ends of pipes this process reads back
    (non-blocking, close-on-exec); fds 0-2 must be open (``/dev/null``).

    The read ends are new fds: the caller keeps :func:`captured_fds` open
    through sandbox entry. Read ends recorded before are forgotten, not
    closed: the fd cleanup that came before closed them, and their numbers
    may now hold something else."""
    hub.captured = {}
    for stream, target in _STDIO_FDS.items():
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # (fds 0-2 are open: both land above them)
        os.dup2(w, target, inheritable=False)
        os.close(w)
        hub.captured[stream] = r


def captured_fds() -> list[int]:
    """The read ends :func:`capture_stdio` made."""
    return list(hub.captured.values())


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

    def fileno(self) -> int:
        """The fd under the stream (1 or 2): what code writes there itself
        (``faulthandler.enable()`` asks for it) is read back as the stream's."""
        return _STDIO_FDS[self._name]

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        hub.write(self._name, s)
        return len(s)

    def flush(self) -> None:
        hub.flush((self._name,))
