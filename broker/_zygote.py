"""Spawning workers through a zygote (or a fresh interpreter per worker).

The zygote is started by exec, never forked from the broker, so it starts
single-threaded and small whatever the broker is running. Worker classes
must be importable by module name in it (not defined in ``__main__`` or
inside a function); ``Broker(spawn="auto")`` falls back to fork for those.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from protocol import ProtocolError, Rights, WorkerCrashed
from protocol._remote import exception_from_wire
from protocol._wire import KIND_STREAM, Channel
from worker import Worker
from worker._serve import forked_from_main_thread

SPAWN_METHODS = ("auto", "zygote", "fork", "exec")


def importable(cls: type[Worker]) -> bool:
    return cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__


class _SockFd:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def __privsep_fd__(self) -> tuple[int, int, Rights]:
        return self.sock.fileno(), KIND_STREAM, Rights.READ | Rights.WRITE


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The zygote must import what the broker imports.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env.pop("PYTHONSTARTUP", None)
    return env


def _start(extra: list[str]) -> tuple[subprocess.Popen[bytes], Channel, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    args = [sys.executable, "-s", "-m", "worker._zygote", str(theirs.fileno()), *extra]
    if forked_from_main_thread():
        args.append("--pdeathsig")
    proc = subprocess.Popen(
        args,
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        env=_env(),
        close_fds=True,
    )
    theirs.close()
    return proc, Channel(ours, send_timeout=30.0), ours


def _request_spawn(
    chan: Channel, cls: type[Worker], spec_wire: Any, timeout: float, grants: list[tuple[str, Any]]
) -> tuple[int, socket.socket]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        chan.send(
            {
                "t": "spawn",
                "module": cls.__module__,
                "qualname": cls.__qualname__,
                "spec": spec_wire,
                "chan": _SockFd(child),
                "grants": [[name, cap] for name, cap in grants],
            }
        )
    finally:
        child.close()
    if not chan.wait_readable(timeout):
        parent.close()
        raise WorkerCrashed(f"zygote did not answer a spawn request within {timeout:g} s")
    reply = chan.recv()
    if type(reply) is dict and reply.get("t") == "spawned" and isinstance(reply.get("pid"), int):
        return reply["pid"], parent
    parent.close()
    if type(reply) is dict and reply.get("t") == "error" and isinstance(reply.get("e"), dict):
        cause = exception_from_wire(reply["e"])
        raise WorkerCrashed(f"cannot start {cls.__qualname__}: {cause}") from cause
    raise ProtocolError("zygote sent a malformed reply")


class Zygote:
    """The broker's side of one zygote process."""

    def __init__(self) -> None:
        self._proc, self._chan, _ = _start([])
        self._lock = threading.Lock()

    def spawn(
        self, cls: type[Worker], spec_wire: Any, timeout: float, grants: list[tuple[str, Any]]
    ) -> tuple[int, socket.socket]:
        with self._lock:
            return _request_spawn(self._chan, cls, spec_wire, timeout, grants)

    def reap(self, pid: int) -> int | None:
        """The exit status of a worker that has ended (call after its pidfd fired)."""
        with self._lock:
            self._chan.send({"t": "reap", "pid": pid})
            if not self._chan.wait_readable(10.0):
                return None
            reply = self._chan.recv()
        if type(reply) is dict and reply.get("t") == "status" and reply.get("pid") == pid:
            status = reply.get("status")
            return status if isinstance(status, int) else None
        return None

    def close(self) -> None:
        self._chan.close()
        try:
            self._proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()


def exec_worker(
    cls: type[Worker], spec_wire: Any, timeout: float, grants: list[tuple[str, Any]]
) -> tuple[int, socket.socket, subprocess.Popen[bytes]]:
    """Start a fresh interpreter that becomes the worker. It is our child."""
    proc, chan, _ = _start(["--exec"])
    try:
        pid, sock = _request_spawn(chan, cls, spec_wire, timeout, grants)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        chan.close()
    return pid, sock, proc
