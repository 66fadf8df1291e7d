"""The worker process: entry after fork, ``setup()``, sandbox, serve loop.

Runs in the child only. Never returns: the process ends with ``os._exit``.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from protocol._messages import check_message
from protocol._remote import exception_to_wire
from protocol._wire import PROTOCOL_VERSION, Channel, ReceivedFd

from ._client import BrokerClient, BrokerGone
from .sandbox._libc import PR_SET_PDEATHSIG, prctl
from ._files import fd_of, wrap_received
from ._rpc import Worker

_FROM_BROKER = frozenset({"call", "stop"})
EXIT_SETUP_FAILED = 70
EXIT_PROTOCOL = 71


def _close_all_but(keep: Sequence[int]) -> None:
    lo = 0
    for fd in sorted(set(keep)):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)


def _quiet_stdio() -> list[int]:
    """Point fds 0-2 at /dev/null so stray prints cannot reach a terminal."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1, 2):
        os.dup2(null, fd, inheritable=False)
    os.close(null)
    return [0, 1, 2]


def _unwrap_args(obj: Any, opened: list[Any]) -> Any:
    if isinstance(obj, ReceivedFd):
        f = wrap_received(obj)
        opened.append(f)
        return f
    if type(obj) is list:
        return [_unwrap_args(x, opened) for x in obj]
    if type(obj) is dict:
        return {k: _unwrap_args(v, opened) for k, v in obj.items()}
    return obj


def _fd_hook(obj: Any) -> tuple[int, int, Any]:
    return fd_of(obj)


def serve(instance: Worker, chan: Channel) -> None:
    """Answer calls until the broker says stop or goes away."""
    methods = type(instance).rpc_methods
    while True:
        msg = chan.recv()
        if msg is None:
            return
        check_message(msg, _FROM_BROKER)
        if msg["t"] == "stop":
            return
        cid, name = msg["id"], msg["m"]
        opened: list[Any] = []
        try:
            if name not in methods:
                raise AttributeError(f"{type(instance).__name__} has no @rpc method {name!r}")
            args = _unwrap_args(msg["a"], opened)
            kwargs = _unwrap_args(msg["k"], opened)
            result = getattr(instance, name)(*args, **kwargs)
            reply: dict[str, Any] = {"t": "ret", "id": cid, "v": result}
            try:
                chan.send(reply, _fd_hook)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name}() returned a value that cannot be sent: {exc}") from exc
        except BrokerGone:
            raise
        except BaseException as exc:
            chan.send({"t": "err", "id": cid, "e": exception_to_wire(exc)})
        finally:
            for f in opened:
                try:
                    f.close()
                except OSError:
                    pass


def child_main(
    cls: type[Worker],
    sock_fd: int,
    prepared: Any,
    grant_fds: Sequence[int],
    *,
    from_main_thread: bool,
    parent_pid: int,
) -> NoReturn:
    """Entry point of a freshly forked worker. Never returns."""
    code = 0
    chan: Channel | None = None
    try:
        import socket

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if from_main_thread:
            # PDEATHSIG follows the forking thread; only the main thread lives
            # as long as the broker does.
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:
                os._exit(0)
        keep = [sock_fd, *grant_fds]
        _close_all_but([0, 1, 2, *keep])
        _quiet_stdio()
        chan = Channel(socket.socket(fileno=sock_fd))
        instance = cls()
        instance.broker = BrokerClient(chan)
        instance.setup()
        _close_all_but([0, 1, 2, *keep])
        sys.stdout = sys.stderr = io.TextIOWrapper(io.BytesIO())  # never the real fds
        report: dict[str, Any] = {"layers": []}
        notify = None
        _freeze_linecache(cls)
        if prepared is not None:
            from .sandbox import enter

            applied = enter(prepared, [0, 1, 2, *keep])
            report = dict(applied)
            nfd = report.pop("notify_fd", None)
            if nfd is not None:
                notify = _Listener(nfd)
        chan.send({"t": "ready", "v": PROTOCOL_VERSION, "pid": os.getpid(), "sandbox": report, "notify": notify})
        if notify is not None:
            notify.close()  # the supervisor's fd must never stay with the supervised
        serve(instance, chan)
    except BrokerGone:
        code = 0
    except BaseException as exc:
        code = EXIT_SETUP_FAILED
        if chan is not None:
            try:
                chan.send({"t": "fail", "e": exception_to_wire(exc)})
            except BaseException:
                pass
    finally:
        os._exit(code)


def _freeze_linecache(cls: type[Worker]) -> None:
    """Tracebacks must not read source files once the sandbox is on: warm
    the cache for the worker's own modules, then serve lines from memory."""
    import inspect
    import linecache

    for klass in cls.__mro__:
        try:
            path = inspect.getsourcefile(klass)
        except (TypeError, OSError):
            continue
        if path:
            linecache.getlines(path)

    def cached_only(filename: str, module_globals: Any = None) -> list[str]:
        entry = linecache.cache.get(filename)
        return list(entry[2]) if entry is not None and len(entry) > 2 else []

    linecache.getlines = cached_only
    linecache.checkcache = lambda filename=None: None


class _Listener:
    """Carries the seccomp listener fd to the broker once, then is closed."""

    def __init__(self, fd: int):
        self.fd = fd

    def __privsep_fd__(self) -> tuple[int, int, Any]:
        from protocol import Rights
        from protocol._wire import KIND_STREAM

        return self.fd, KIND_STREAM, Rights.READ

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def forked_from_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
