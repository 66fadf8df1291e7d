"""The worker classes of test_hostile.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import errno
import os
import time

import msgpack
from _common import close_later

from protocol import Rights
from protocol._wire import (
    _BLOB_EXT,
    EXT_TEXT,
)
from worker import Worker, rpc

_SCM_MAX_FD = 253  # the most fds Linux passes in one message (include/net/scm.h)


FILE_OUTPUT = Rights.WRITE | Rights.SEEK | Rights.FSTAT | Rights.FTRUNCATE


class Evil(Worker):
    def setup(self) -> None:
        import socket

        # Before the sandbox: room for oversize packets (setsockopt is denied after).
        self.broker._chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)

    @rpc
    def blast(self, packets: list) -> str:
        chan = self.broker._chan
        r, w = os.pipe()  # one fd, named nfds times (SCM_RIGHTS allows it): no fd table of 254 pipes to run out of
        try:
            for payload, nfds in packets:
                try:
                    chan.send_raw(payload, [r] * nfds)
                except OSError as exc:
                    if nfds > _SCM_MAX_FD and exc.errno == errno.EINVAL:
                        continue  # more fds than the kernel passes in one message: it refuses the send
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                        continue  # the broker has dropped this worker's connection (an earlier packet)
                    raise
        finally:
            os.close(r)
            os.close(w)
        return "sent"

    @rpc
    def ping(self) -> str:
        return "pong"


class KeepsOutputs(Worker):
    """Writes outputs and keeps a copy of a pipe's write end past its answer."""

    @rpc
    def outputs(self, names: list, kept: list, close_after: float) -> str:
        copies = []
        for name in names:
            # WRITE alone: a pipe the broker drains; with SEEK|FSTAT|FTRUNCATE (.bin): the file itself.
            f = self.broker.create(f"out/{name}", FILE_OUTPUT if name.endswith(".bin") else Rights.WRITE)
            f.write(name.encode())
            f.flush()
            if name in kept:
                copies.append(os.dup(f.fileno()))
        close_later(copies, close_after)
        return "returned"

    @rpc
    def keep_and_fail(self, name: str) -> None:
        f = self.broker.create(f"out/{name}", FILE_OUTPUT)
        close_later([os.dup(f.fileno())], 30.0)
        f.close()
        raise ValueError("failed, its output's file kept")

    @rpc
    def fail_with_output_open(self, name: str) -> None:
        f = self.broker.create(f"out/{name}", FILE_OUTPUT)  # (closed as the traceback goes, after the answer)
        f.write(b"partial")
        raise ValueError("failed while writing")

    @rpc
    def output_then_directory(self, name: str) -> str:
        for n in ("a.txt", name):
            with self.broker.create(f"out/{n}", Rights.WRITE) as f:
                f.write(n.encode())
        self.broker.mkdir(f"out/{name}")  # the second output's name is a directory's now
        return "returned"


class BlobRequester(Worker):
    @rpc
    def ask_with_a_blob(self) -> None:
        """A request whose path travels as a 16 MiB text blob."""
        from protocol._wire import _region

        assert _region is not None  # (memfd_create is denied: its memfds for values)
        os.pwrite(_region.fds[0], b"a" * (16 << 20), 0)
        path = msgpack.ExtType(EXT_TEXT, _BLOB_EXT.pack(0, 0, 16 << 20))
        req = {"t": "req", "id": 1, "op": "stat", "a": {"path": path}}
        self.broker._chan.send_raw(msgpack.packb(req), [_region.fds[0]])
        time.sleep(10)  # (the broker ends it first)

    @rpc
    def ping(self) -> str:
        return "pong"


class InFlightHog(Worker):
    """A compromised worker parking fds in flight (sent, never received) on a socketpair of its own."""

    @rpc
    def park(self) -> int:
        import array
        import socket

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.kept = (a, b)
        sent = 0
        for _ in range(100):
            try:
                a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [a.fileno()] * 250))])
            except OSError as exc:
                if exc.errno != errno.ETOOMANYREFS:
                    raise
                break
            sent += 250
        return sent

    @rpc
    def big(self, n: int) -> bytes:
        return b"z" * n

    @rpc
    def ids(self) -> list[int]:
        return [os.getuid(), os.geteuid()]

    @rpc
    def threads(self, n: int) -> int:
        """Start up to ``n`` threads that wait; how many started."""
        import threading

        stop = threading.Event()
        started = []
        try:
            for _ in range(n):
                t = threading.Thread(target=stop.wait)
                t.start()
                started.append(t)
        except RuntimeError:  # can't start new thread: RLIMIT_NPROC
            pass
        stop.set()
        for t in started:
            t.join()
        return len(started)


class TimerHog(Worker):
    """POSIX timers by the raw syscall (each holds a queued-signal slot)."""

    @rpc
    def timers(self, most: int) -> int:
        from worker.sandbox._libc import ffi, lib

        tid = ffi.new("int *")
        made = 0
        while made < most:
            if lib.syscall(ffi.cast("long", 222), ffi.cast("long", 1), ffi.NULL, tid) != 0:  # timer_create
                break
            made += 1
        return made


class QueueStuffer(Worker):
    @rpc
    def answer_and_stop_reading(self) -> None:
        """Answers this call (the handle's first) itself, then never reads its
        channel again, as a worker that keeps its queue full would."""
        self.broker._chan.sock.send(msgpack.packb({"t": "ret", "id": 1, "v": None}))
        while True:
            time.sleep(3600)
