"""The worker classes of test_async.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import close_later

from protocol import Rights
from worker import Worker, rpc


def _send_with_text_blob(worker: Worker, data: bytes, message: Callable[[Any], dict[str, Any]]) -> None:
    """Send ``message(blob)``, ``blob`` naming ``data`` as text in a memfd,
    as a compromised worker may (in a call, or in setup())."""
    import msgpack

    from protocol._wire import _BLOB_EXT, EXT_TEXT

    fd = os.memfd_create("text", os.MFD_CLOEXEC)
    os.write(fd, data)
    blob = msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(0, 0, len(data)))
    worker.broker._chan.send_raw(msgpack.packb(message(blob)), [fd])


def _error_saying(blob: Any) -> dict[str, Any]:
    """An error in its wire form, its message a blob."""
    from protocol._remote import exception_to_wire

    return {**exception_to_wire(ValueError("short")), "msg": blob}


class AsyncJob(Worker):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def nap(self, t: float) -> int:
        time.sleep(t)
        return os.getpid()

    @rpc
    def read(self, name: str) -> bytes:
        with self.broker.open(f"data/{name}", Rights.READ) as f:
            return f.read()

    @rpc
    def write(self, name: str, data: bytes) -> None:
        with self.broker.create(f"out/{name}") as f:
            f.write(data)

    @rpc
    def write_slowly(self, name: str, t: float) -> None:
        with self.broker.create(f"out/{name}") as f:
            f.write(b"half")
            time.sleep(t)

    @rpc
    def exit_after(self, t: float, code: int) -> None:
        time.sleep(t)
        os._exit(code)

    @rpc
    def size(self, data: bytes) -> int:
        return len(data)

    @rpc
    def refuse(self, *_: Any) -> None:
        raise ValueError("not an image")

    @rpc
    def weigh(self, *values: Any) -> int:
        """The bytes of every buffer in ``values``, however nested."""
        return sum(len(v) if isinstance(v, bytes) else self.weigh(*v) if isinstance(v, list) else
                   self.weigh(*v.values()) if isinstance(v, dict) else 0 for v in values)

    @rpc
    def append(self, name: str, data: bytes) -> int:
        with self.broker.open(f"out/{name}", Rights.WRITE | Rights.SEEK | Rights.FSTAT) as f:
            f.seek(0, os.SEEK_END)
            return f.write(data)

    @rpc
    def append_to(self, f: Any, data: bytes) -> int:
        f.seek(0, os.SEEK_END)
        return int(f.write(data))

    @rpc
    def half_close(self, how: int) -> None:
        """Shut one direction of its channel down and run on (SHUT_RD: a request
        sent after it, whose answer the broker cannot send)."""
        self.broker._chan.sock.shutdown(how)
        if how == socket.SHUT_RD:
            self.broker._chan.send({"t": "req", "id": 1, "op": "stat", "a": {"path": "data/a.txt"}})
        time.sleep(30)

    @rpc
    def flood(self, seconds: float) -> None:
        """Shut its read side down, then keep requests coming for ``seconds``."""
        chan = self.broker._chan
        chan.sock.shutdown(socket.SHUT_RD)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            i += 1
            chan.send({"t": "req", "id": i, "op": "stat", "a": {"path": "data/a.txt"}})
        time.sleep(30)

    @rpc
    def hold_the_gil(self) -> None:
        """Answer, then keep the main thread from reading its next message (a
        stop): a thread runs C code that never lets the GIL go."""
        threading.Thread(target=lambda: (time.sleep(0.1), sum(range(10**12))), daemon=True).start()

    @rpc
    def exit_later(self, t: float, code: int) -> None:
        """Answer, then end on a thread ``t`` seconds later, between calls."""
        threading.Thread(target=lambda: (time.sleep(t), os._exit(code)), daemon=True).start()

    @rpc
    def ask_and_exit(self, t: float, code: int, n: int = 1) -> None:
        """Send ``n`` requests and end ``t`` seconds later without reading their answers."""
        for i in range(n):
            self.broker._chan.send({"t": "req", "id": i + 1, "op": "stat", "a": {"path": "data/a.txt"}})
        time.sleep(t)
        os._exit(code)


class FailingSetup(Worker):
    def setup(self) -> None:
        raise ValueError("no config")

    @rpc
    def ping(self) -> str:
        return "pong"


class ExitingSetup(Worker):
    def setup(self) -> None:
        os._exit(4)

    @rpc
    def ping(self) -> str:
        return "pong"


class RunsOn(Worker):
    @rpc
    def hang_up_and_run_on(self) -> None:
        self.broker._chan.sock.shutdown(socket.SHUT_RDWR)  # the broker sees EOF mid-call
        time.sleep(30)


class Holder(Worker):
    @rpc
    def hold(self, mib: int, seconds: float) -> None:
        block = bytearray(mib << 20)
        for i in range(0, len(block), 4096):  # touched: the kernel must free every page at its end
            block[i] = 1
        time.sleep(seconds)


class KeepsOutputs(Worker):
    @rpc
    def keep(self, n: int, close_after: float) -> str:
        """Outputs through a pipe (WRITE alone), each with a copy of its write
        end kept past the answer, closed ``close_after`` s later."""
        kept = []
        for i in range(n):
            f = self.broker.create(f"out/kept{i}.txt", Rights.WRITE)
            f.write(b"data")
            f.flush()
            kept.append(os.dup(f.fileno()))
        close_later(kept, close_after)
        return "returned"

    @rpc
    def ping(self) -> str:
        return "pong"


class BigWriter(Worker):
    @rpc
    def write_big(self, name: str, mib: int) -> int:
        chunk = b"\x5a" * (1 << 20)
        with self.broker.create(f"out/{name}", Rights.WRITE | Rights.SEEK | Rights.FSTAT) as f:
            for _ in range(mib):
                f.write(chunk)
        return mib


class PipelinedLister(Worker):
    @rpc
    def flood(self, path: str, depth: int) -> int:
        """As a compromised worker may: send ``depth`` listing requests before reading any answer,
        so that the broker finds the next one waiting each time."""
        chan = self.broker._chan
        for i in range(depth):
            chan.send({"t": "req", "id": 1 << 30 | i, "op": "listdir", "a": {"path": path, "at": 0}})
        for _ in range(depth):
            chan.recv()
        return depth


class Lister(Worker):
    @rpc
    def ls(self, path: str) -> int:
        return len(self.broker.listdir(path))


class Pipeliner(Worker):
    @rpc
    def pipeline(self, n: int, batch: int) -> int:
        """Requests sent ``batch`` at a time before their answers are read, as
        a compromised worker may: the broker always finds the next waiting."""
        client, done = self.broker, 0
        with client._lock:
            while done < n:
                ids = [next(client._ids) for _ in range(batch)]
                for rid in ids:
                    client._chan.send({"t": "req", "id": rid, "op": "stat", "a": {"path": "data/a.txt"}})
                for _ in ids:
                    assert client._chan.recv()["t"] == "rep"
                    done += 1
        return done


class Asker(Worker):
    @rpc
    def ask(self, n: int) -> int:
        for _ in range(n):
            self.broker.stat("data/a.txt")
        return n


class BigAnswers(Worker):
    @rpc
    def make(self, kind: str, size: int) -> Any:
        return b"x" * size if kind == "bytes" else "\u00e9" * (size // 2)

    @rpc
    def answer_badly(self) -> None:
        """An answer whose text blob is not UTF-8, as a compromised worker may send."""
        _send_with_text_blob(self, b"\xff\xfe not UTF-8", lambda blob: {"t": "ret", "id": 1, "v": blob})
        time.sleep(10)

    @rpc
    def fail_with_a_blob(self) -> None:
        """An error whose message is a text blob: no honest error needs one."""
        _send_with_text_blob(self, b"x" * 1000, lambda blob: {"t": "err", "id": 1, "e": _error_saying(blob)})
        time.sleep(10)

    @rpc
    def raise_big(self) -> None:
        """An honest error with every field as long as it can be."""
        big = type("E" * 100_000, (OSError,), {})
        raise big(2, "\U0001F600" * 100_000, "\U0001F600" * 100_000)


class FailsWithABlob(Worker):
    def setup(self) -> None:
        """A handshake's failure whose message is a text blob."""
        _send_with_text_blob(self, b"x" * 1000, lambda blob: {"t": "fail", "e": _error_saying(blob)})
        os._exit(1)

    @rpc
    def ping(self) -> str:
        return "pong"
