"""The worker classes of test_supervision.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import READ

from protocol import NotCapable, Rights
from worker import Worker, rpc

_FLOOD = 200_000  # characters: about as many as one 256 KiB packet holds


class Hog(Worker):
    @rpc
    def tempfile(self) -> None:
        import tempfile

        with tempfile.TemporaryFile():
            pass

    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc
    def eat(self, gib: int) -> int:
        block = bytearray(gib << 30)
        return len(block)

    @rpc
    def spin(self) -> None:
        while True:
            pass

    @rpc
    def forbidden(self) -> str:
        try:
            os.open("/etc/hostname", os.O_RDONLY)
        except OSError as exc:
            return f"errno {exc.errno}"
        return "opened"

    @rpc
    def forbidden_times(self, n: int) -> int:
        denied = 0
        for _ in range(n):
            try:
                os.stat("/etc/hostname")
            except PermissionError:
                denied += 1
        return denied

    @rpc
    def late_import(self) -> None:
        import privsep_no_such_module  # type: ignore[import-not-found]  # noqa: F401 - looked for on sys.path

    @rpc
    def connect_unix(self, path: str) -> None:
        import socket

        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(path)

    @rpc
    def stat_a_package(self) -> None:
        # What a lazy import of a submodule does first (concurrent.futures.ThreadPoolExecutor
        # imports .thread on first use): stat the package's directory.
        os.stat(os.path.dirname(json.__file__))

    @rpc
    def stat_a_data_file(self) -> None:
        os.stat(os.path.join(os.path.dirname(json.__file__), "data.json"))

    @rpc
    def read_a_source_file(self) -> None:
        with open(json.__file__, "rb"):  # as Python's own traceback printer reads one
            pass

    @rpc
    def flood(self, n: int) -> int:
        denied = 0
        for _ in range(n):
            try:
                self.broker.stat("data/a.txt")
            except NotCapable:
                denied += 1
        return denied

    @rpc
    def talk_forever(self, window: int = 0) -> None:
        """Never answer the call; keep requests always waiting for the broker (a thread
        reads the answers, so the sender never has to pause). With ``window``, at most
        that many are unanswered at a time, so the answers always fit in this end's
        socket buffer even when the reader is slow to get the GIL (the async face ends
        a worker whose buffer is full at once: it never waits on the loop)."""
        import threading

        chan = self.broker._chan
        room = threading.Semaphore(window) if window else None

        def drain() -> None:
            while chan.recv() is not None:
                if room is not None:
                    room.release()

        threading.Thread(target=drain, daemon=True).start()
        i = 0
        while True:
            i += 1
            if room is not None:
                room.acquire()
            chan.send({"t": "req", "id": 100_000 + i, "op": "stat", "a": {"path": "data/a.txt"}})

    @rpc
    def flood_pipelined(self, n: int) -> int:
        """Send n requests without reading any answer, as a hostile worker may."""
        for i in range(n):
            self.broker._chan.send({"t": "req", "id": 10_000 + i, "op": "stat", "a": {"path": "data/a.txt"}})
        got = 0
        for _ in range(n):
            if self.broker._chan.recv() is None:
                break
            got += 1
        return got

    @rpc
    def report(self) -> dict:
        return {"pid": os.getpid()}


class SelfSignaller(Worker):
    @rpc
    def die_of(self, sig: int) -> None:
        os.kill(os.getpid(), sig)
        time.sleep(10)


class ClockReader(Worker):
    @rpc
    def cpu_time_of(self, pid: int) -> float:
        return time.clock_gettime((~pid << 3) | 2)  # that process's CPU clock (CPUCLOCK_SCHED)


class LateOffender(Worker):
    """Answers, then makes a forbidden syscall on a thread of its own, while
    no call runs."""

    got: Any = None

    @rpc
    def violate_later(self, delay: float, times: int = 1) -> str:
        def offend() -> None:
            time.sleep(delay)
            t0, errors = time.monotonic(), []
            for _ in range(times):
                try:
                    os.open("/etc/hostname", os.O_RDONLY)
                    errors.append("opened")
                except OSError as exc:
                    errors.append(exc.errno)
            LateOffender.got = errors[0] if times == 1 else (errors, time.monotonic() - t0)

        threading.Thread(target=offend, daemon=True).start()
        return "returned"

    def _at_stop(self, action: Callable[[], object]) -> str:
        """Run ``action`` when the stop message is read (before obeying it)."""
        chan = self.broker._chan
        real = chan.recv

        def recv(*args: Any, **kwargs: Any) -> Any:
            msg = real(*args, **kwargs)
            if isinstance(msg, dict) and msg.get("t") == "stop":
                action()
            return msg

        chan.recv = recv  # type: ignore[method-assign]
        return "armed"

    @rpc
    def linger_at_stop(self, seconds: float) -> str:
        """At the stop message, take ``seconds`` before obeying it."""
        return self._at_stop(lambda: time.sleep(seconds))

    @rpc
    def exit_at_stop(self, delay: float, status: int) -> str:
        """At the stop message, exit with ``status`` ``delay`` seconds later."""
        return self._at_stop(lambda: (time.sleep(delay), os._exit(status)))

    @rpc
    def exit_later(self, delay: float, status: int) -> str:
        """A thread of its own ends the process once the call has answered."""
        threading.Thread(target=lambda: (time.sleep(delay), os._exit(status)), daemon=True).start()
        return "returned"

    @rpc
    def offend_at_stop(self) -> str:
        """At the stop message: a thread makes a forbidden syscall, and the
        worker takes a second to end."""

        def offend() -> None:
            threading.Thread(target=os.open, args=("/etc/hostname", os.O_RDONLY), daemon=True).start()
            time.sleep(1.0)

        return self._at_stop(offend)

    @rpc
    def flood_and_ignore_stop(self, threads: int) -> str:
        """Threads that make forbidden syscalls without end, and a stop message never obeyed."""
        chan = self.broker._chan
        real = chan.recv

        def recv(*args: Any, **kwargs: Any) -> Any:
            msg = real(*args, **kwargs)
            while isinstance(msg, dict) and msg.get("t") == "stop":
                time.sleep(3600)
            return msg

        def offend() -> None:
            while True:
                try:
                    os.open("/etc/hostname", os.O_RDONLY)
                except OSError:
                    pass

        chan.recv = recv  # type: ignore[method-assign]
        for _ in range(threads):
            threading.Thread(target=offend, daemon=True).start()
        return "flooding"

    @rpc
    def print_while_offending(self, seconds: float) -> int:
        """Threads keep the channel full of printed lines while others make
        forbidden syscalls; returns how many of those were answered meanwhile."""
        from protocol._wire import _plain_packer

        chan, line = self.broker._chan, _plain_packer.pack({"t": "out", "s": "stdout", "x": "x"})
        answered, until = [0], time.monotonic() + seconds

        def offend() -> None:
            while time.monotonic() < until:
                try:
                    os.open("/etc/hostname", os.O_RDONLY)
                except OSError:
                    answered[0] += 1

        def flood() -> None:
            while time.monotonic() < until:
                chan.send_raw(line)

        threads = [threading.Thread(target=f) for f in (offend, offend, flood, flood)]
        for t in threads:
            t.start()
        for t in threads[2:]:
            t.join()
        return answered[0]

    @rpc
    def result(self) -> Any:
        return LateOffender.got

    @rpc
    def ping(self) -> str:
        return "pong"


class Mapper(Worker):
    @rpc
    def map_it(self, f: Any) -> int:
        import mmap

        return len(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))


class Dialer(Worker):
    @rpc
    def tcp_socket(self) -> None:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    @rpc
    def kill_init(self) -> None:
        os.kill(1, signal.SIGKILL)

    @rpc
    def attach(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(101, 16, 1, 0, 0)  # ptrace(PTRACE_ATTACH, init)

    @rpc
    def raw_kill(self, pid: int, sig: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(62, ctypes.c_uint64(pid % 2**64), ctypes.c_uint64(sig))  # (-1: all 64 bits set)


class ProxyReader(Worker):
    @rpc
    def read_both(self) -> list[bytes]:
        out = []
        for name in ("data/public", "data/secret"):
            d = self.broker.opendir(name, Rights.LOOKUP | Rights.READ | Rights.FSTAT)
            with d.open("x.txt") as f:
                out.append(f.read())
            try:
                d.open("missing.txt")
            except FileNotFoundError:
                pass
            else:
                raise AssertionError("missing.txt opened")
        return out

    @rpc
    def stat_in(self, d: Any) -> int:
        return d.stat("x.txt").size


class Speller(Worker):
    @rpc
    def spellings(self) -> list[str]:
        """Raw requests (the client would tidy the path): the broker's check alone."""
        got = []
        for i, path in enumerate(["data/public/x.txt", "data//public/./x.txt", "./data/public/x.txt/",
                                  "data//public/./missing.txt", "data//public/../x.txt"]):
            self.broker._chan.send({"t": "req", "id": 1000 + i, "op": "stat", "a": {"path": path}})
            got.append(self.broker._chan.recv()["t"])
        return got


class Forger(Worker):
    """A compromised worker writing lines of its own into the broker's log."""

    @rpc
    def forge_audit(self, line: str) -> str:
        try:
            self.broker.open(f"data/x\n{line}", READ)
        except OSError as exc:
            return type(exc).__name__
        return "opened"

    @rpc
    def open_named(self, path: str) -> str:
        try:
            self.broker.open(path, READ)
        except OSError as exc:
            return type(exc).__name__
        return "opened"


class ForgingSetup(Worker):
    def setup(self) -> None:
        raise ValueError("boom\rINFO privsep.broker worker #1 ended: ok (stopped)\u2028\x1b[2K")

    @rpc
    def ping(self) -> str:
        return "pong"


class Flooder(Worker):
    """A compromised worker sending requests whose path is as long as a packet
    holds (inline: a blob in a request ends the worker), control characters."""

    @rpc
    def flood_audit(self, n: int) -> int:
        import msgpack

        chan = self.broker._chan
        refused = 0
        for i in range(n):
            req = {"t": "req", "id": 1000 + i, "op": "open", "a": {"path": "\x01" * _FLOOD, "rights": int(READ)}}
            chan.send_raw(msgpack.packb(req))
            reply = chan.recv()
            refused += reply["t"] == "rerr"
        return refused


class Deaf(Worker):
    """A compromised worker that sends requests back to back and never reads
    the answers: the broker's answers fill its socket, and the broker's send waits."""

    @rpc
    def pipeline(self, n: int) -> None:
        import msgpack

        chan = self.broker._chan
        for i in range(n):
            chan.send_raw(msgpack.packb({"t": "req", "id": 1000 + i, "op": "stat", "a": {"path": "data/x"}}))
        time.sleep(60)


class Relister(Worker):
    """A compromised worker asking for the first page of one listing again and again."""

    @rpc
    def relist(self, path: str, n: int) -> int:
        chan = self.broker._chan
        names = 0
        for i in range(n):
            chan.send({"t": "req", "id": 1000 + i, "op": "listdir", "a": {"path": path, "at": 0}})
            names += len(chan.recv()["v"]["names"])
        return names


class Asker(Worker):
    """A compromised worker: requests sent raw, answers read raw."""

    @rpc
    def ask(self, path: str, n: int) -> int:
        chan = self.broker._chan
        for i in range(n):
            chan.send({"t": "req", "id": 1000 + i, "op": "stat", "a": {"path": path}})
            chan.recv()
        return n

    @rpc
    def list_then_ask(self, path: str) -> int:
        chan = self.broker._chan
        chan.send({"t": "req", "id": 1, "op": "listdir", "a": {"path": path, "at": 0}})
        names = len(chan.recv()["v"]["names"])
        chan.send({"t": "req", "id": 2, "op": "stat", "a": {"path": path}})
        chan.recv()
        return names

    @rpc
    def ping(self) -> str:
        return "pong"


class Printer(Worker):
    def setup(self) -> None:
        print("from setup()")
        print("x" * 100_000 if os.environ.get("PRIVSEP_TEST_SETUP_FLOOD") else "second setup line")

    @rpc
    def talk(self) -> str:
        import sys
        import warnings

        print("one", 1)
        print("\x1b]0;owned\x07 escaped")
        print("w" * 5000)  # more than one out message
        print("to stderr", file=sys.stderr)
        t = threading.Thread(target=print, args=("from a thread",))
        t.start()
        t.join()
        warnings.warn("careful", stacklevel=1)
        sys.stdout.buffer.write("bytes é\n".encode() + b"\xff\n")  # (code that writes bytes)
        print("no newline", end="")
        return "done"

    @rpc
    def lines(self, n: int) -> int:
        for i in range(n):
            print(i)
        return n

    @rpc
    def raw(self, stream: str, text: str) -> str:  # what a compromised worker may send
        self.broker._chan.send({"t": "out", "s": stream, "x": text})
        return "sent"


class FdWriter(Worker):
    """Writes to fds 1 and 2 themselves, as C code does (os.write, and faulthandler's own C writes)."""

    def setup(self) -> None:
        import faulthandler
        import sys

        faulthandler.enable()  # (it asks sys.stderr for its fileno(): setup() failed with UnsupportedOperation)
        os.write(1, b"fd 1 in setup()\n")
        assert sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2

    @rpc
    def mixed(self) -> str:
        import faulthandler
        import sys

        os.write(1, b"fd 1 first\n")
        print("then print()")
        os.write(2, "fd 2 \u00e9 \x1b[31m\n".encode())
        print("then stderr", file=sys.stderr)
        faulthandler.dump_traceback(2, all_threads=False)  # C writing to fd 2
        os.write(1, b"no newline at the end")
        return "done"

    @rpc
    def flood(self, n: int) -> list[Any]:
        """Write ``n`` bytes to fd 2 in 4 KiB pieces; what the pipe took, and how the rest failed."""
        taken, failed = 0, ""
        while taken < n:
            try:
                taken += os.write(2, b"e" * 4095 + b"\n")
            except OSError as exc:
                failed = type(exc).__name__
                break
        return [taken, failed]


class Segfaults(Worker):
    def setup(self) -> None:
        import ctypes
        import faulthandler

        faulthandler.enable()
        self.ctypes = ctypes  # (imported before sandbox entry)

    @rpc
    def die(self) -> None:
        os.write(2, b"dying words\n")
        self.ctypes.string_at(0)  # SIGSEGV: faulthandler writes its report to fd 2, and the worker dies of it

    @rpc
    def flood_and_die(self) -> None:
        os.write(2, b"\n" * 20000 + b"line\n" * 5000)
        os._exit(3)

    @rpc
    def ping(self) -> str:
        return "pong"


class Decoder(Worker):
    """What a document parser does without an import statement of its own."""

    @rpc
    def decode(self) -> list[str]:
        import datetime

        return [
            b"caf\xe9".decode("latin-1"),
            b"\x80".decode("cp1252"),
            b"\x82".decode("cp437"),  # a ZIP member name without the UTF-8 flag
            b"\x82\xa0".decode("shift_jis"),
            "bücher.de".encode("idna").decode(),
            b"\xff\xfeh\x00i\x00".decode("utf-16"),
            "ok".encode("utf-32-be").decode("utf_32_be"),
            time.strftime("%Y", time.strptime("2024-01-02", "%Y-%m-%d")),
            datetime.datetime.strptime("03:04", "%H:%M").strftime("%H.%M"),
        ]
