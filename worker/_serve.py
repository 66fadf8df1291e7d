"""The worker process: entry after fork, ``setup()``, sandbox, serve loop.

Runs in the child only. Never returns: the process ends with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from protocol import MessageTooLarge, Rights
from protocol._messages import check_message
from protocol._remote import exception_to_wire
from protocol._wire import (
    CHECK_BLOB_LEN,
    INT_MAX,
    INT_MIN,
    KIND_DIR,
    PROTOCOL_VERSION,
    SCALAR_TYPES,
    Channel,
    DirRef,
    ReceivedFd,
    check_sendable,
    fd_marker,
    plain,
)

from . import _lifeline
from ._client import BrokerClient, BrokerGone
from ._files import FdDirectory, ProxyDirectory, fd_of, open_fd, wrap_received
from ._output import Output, capture_stdio, captured_fds
from ._output import hub as output
from ._rpc import Worker
from .sandbox._libc import PR_SET_PDEATHSIG, prctl

_FROM_BROKER = frozenset({"call", "stop", "cfg"})
EXIT_SETUP_FAILED = 70
EXIT_PROTOCOL = 71


def _close_all_but(keep: Sequence[int]) -> None:
    lo = 0
    for fd in sorted(set(keep)):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)


def _quiet_stdio() -> None:
    """Point fd 0 at /dev/null, and fds 1 and 2 at pipes this worker reads
    back (worker._output): no write reaches a terminal, and what C code
    writes can reach the broker's log."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd, inheritable=False)
    if null > 2:
        os.close(null)
    capture_stdio()


def _unwrap_args(obj: Any, opened: list[Any], client: BrokerClient) -> Any:
    if type(obj) in SCALAR_TYPES:
        return obj
    if type(obj) is ReceivedFd:
        f = wrap_received(obj)
        opened.append(f)
        return f
    if isinstance(obj, DirRef):
        d = ProxyDirectory(client, obj, owned=False)  # the broker lets it go when the call ends
        opened.append(d)
        return d
    if type(obj) is list:
        return obj if plain(obj) else [_unwrap_args(x, opened, client) for x in obj]
    if type(obj) is dict:
        return obj if plain(obj.values()) else {k: _unwrap_args(v, opened, client) for k, v in obj.items()}
    return obj


_NONE_OPENED: list[Any] = []  # a call without arguments opens nothing (never appended to)


def _fd_hook(obj: Any) -> tuple[int, int, Any]:
    return fd_of(obj)


def serve(instance: Worker, chan: Channel) -> None:
    """Answer calls until the broker says stop or goes away."""
    methods = type(instance).rpc_methods
    client = instance.broker
    while True:
        msg = chan.recv()
        if msg is None:
            return
        check_message(msg, _FROM_BROKER)
        if msg["t"] != "call":
            if msg["t"] == "stop":
                return
            output.configure(msg["out"])  # "cfg"
            continue
        cid, name, a, k = msg["id"], msg["m"], msg["a"], msg["k"]
        opened: list[Any] = [] if a or k else _NONE_OPENED
        try:
            if name not in methods:
                raise AttributeError(f"{type(instance).__name__} has no @rpc method {name!r}")
            client._in_call = True
            if output.forward is not False:
                if output.forward is None:
                    output.configure(False)  # the broker did not ask for the output before a call
                else:
                    output.collect()  # what was printed since the last call
            try:
                result = getattr(instance, name)(
                    *([_unwrap_args(x, opened, client) for x in a] if a else ()),
                    **(_unwrap_args(k, opened, client) if k else {}),
                )
            finally:
                if output.forward:
                    output.flush()  # (a line begun and not ended goes as it is)
                    output.send(block=True)  # (the call's lines before its answer)
                client._in_call = False  # no request from now on...
                if client._threaded:
                    with client._lock:  # ...and none of another thread's still in flight
                        pass
                if client._created:
                    client._end_call()  # outputs are closed (flushed) before the answer
            try:
                rtype = type(result)
                if rtype in SCALAR_TYPES:
                    if (rtype is int and not INT_MIN <= result <= INT_MAX) or (
                        (rtype is bytes or rtype is str) and len(result) > CHECK_BLOB_LEN
                    ):
                        check_sendable(result)  # raises, saying why
                    chan.send({"t": "ret", "id": cid, "v": result})
                elif rtype is io.BufferedReader and not result.closed and "_privsep_ret" in result.__dict__:
                    # A reader returned before: its marker is known (fd, kind and mode never change).
                    chan.send_one_fd({"t": "ret", "id": cid, "v": result._privsep_ret}, result.fileno())
                elif isinstance(result, io.IOBase):
                    # A file returned as is: it is the message's one fd.
                    fd, kind, rights = fd_of(result)
                    marker = fd_marker(0, kind, int(rights))
                    if rtype is io.BufferedReader:
                        result._privsep_ret = marker  # type: ignore[attr-defined]
                    chan.send_one_fd({"t": "ret", "id": cid, "v": marker}, fd)
                else:
                    check_sendable(result, 1)  # the broker would end us for it: say why instead
                    chan.send({"t": "ret", "id": cid, "v": result}, _fd_hook)
            except MessageTooLarge as exc:
                raise MessageTooLarge(f"{name}() returned a value too large to send: {exc}") from exc
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


CHANNEL_FD = 3
NET_FD = 9  # a network namespace made ahead of time, until sandbox entry joins and closes it
GRANT_BASE = 10  # grant i lives at fd GRANT_BASE + i (pinned by the filter)


def grant_slots(grants: Sequence[tuple[str, int, Rights]]) -> tuple[tuple[int, int], ...]:
    """(fd number in the worker, rights) for each spawn grant, in order."""
    return tuple((GRANT_BASE + i, int(rights)) for i, (_, _, rights) in enumerate(grants))


def _settle_fds(sock_fd: int, grant_fds: Sequence[int], net_fd: int | None = None, lifeline: int | None = None
                ) -> None:  # fmt: skip
    """Move the channel to CHANNEL_FD, grant i to GRANT_BASE + i, a network
    namespace fd to NET_FD and a lifeline (``lifeline``, or the one settled
    before) above them all (``worker._lifeline``), and close everything
    else. Two steps, so that no source is clobbered."""
    import fcntl

    sources = [sock_fd, *grant_fds, *([] if net_fd is None else [net_fd])]
    targets = [CHANNEL_FD, *(GRANT_BASE + i for i in range(len(grant_fds))), *([] if net_fd is None else [NET_FD])]
    if lifeline is None and _lifeline.slot >= 0:
        lifeline = _lifeline.slot  # settled before (a spare's), settled again with its grants
    _lifeline.slot = -1
    if lifeline is not None:
        slot = _lifeline.place(max(targets), len(sources) + 1)
        if slot >= 0:  # (else no room under the fd limit: closed below, the parent-death signal alone)
            sources.append(lifeline)
            targets.append(slot)
            _lifeline.slot = slot
    # Above every target, so no dup2 below lands on a temp (and within any fd limit that fits the targets).
    temps = [fcntl.fcntl(fd, fcntl.F_DUPFD, max(targets) + 1) for fd in sources]
    _close_all_but([0, 1, 2, *temps])  # stdio stays until _quiet_stdio replaces it
    for target, temp in zip(targets, temps, strict=True):
        os.dup2(temp, target, inheritable=False)
    for temp in temps:
        os.close(temp)


def child_main(
    cls: type[Worker],
    sock_fd: int,
    prepared: Any,
    grants: Sequence[tuple[str, int, int, Rights]] = (),
    *,
    pdeathsig: bool,
    parent_pid: int,
    net_fd: int | None = None,
    chan_ready: Channel | None = None,
    lifeline: int | None = None,
) -> NoReturn:
    """Entry point of a freshly forked worker. Never returns.

    ``grants`` are (name, fd, kind, rights) held from spawn; they appear as
    ``self.grants[name]`` and are pinned to fixed fd numbers. ``net_fd``: a
    fresh network namespace to join at sandbox entry (taken over).
    ``chan_ready``: a Channel already on CHANNEL_FD (a spare made it while it
    waited, after ``while_waiting()``: with no grants to move, there is
    nothing left to settle). ``lifeline``: a read end of one of the
    broker's lifelines, from which this worker arms its own
    (worker._lifeline).
    """
    chan: Channel | None = None
    try:
        import socket

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A process group of its own: processes it may make (allow-fork, or no sandbox) stay in it,
        # and the broker ends them with it (killpg). (It ignores SIGINT either way.)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        # Signals the broker's forking thread blocked stay blocked in a fork (and through exec):
        # a worker's own signal.alarm() bounding a parse would never go off.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        # Nor does a broker's ignored SIGCHLD (a server's way to have its children reaped for it):
        # a worker's own subprocess.run() (allow-fork, or no sandbox) would find its child gone.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if pdeathsig:
            # The signal follows the forking thread: ``pdeathsig`` says that one lives as
            # long as its process (the broker's: see broker._parent; the zygote's main thread).
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:
                os._exit(0)
        armed = None if lifeline is None else _lifeline.arm(lifeline)
        if chan_ready is not None and not grants and _waited:
            chan = chan_ready  # the spare settled its fds and stdio while it waited
            if prepared is None and net_fd is not None:
                os.close(net_fd)  # unsandboxed: no namespace to join
                net_fd = None
        else:
            _settle_fds(sock_fd, [g[1] for g in grants], net_fd if prepared is not None else None, armed)
            # (unsandboxed: settling closed the namespace fd with everything else)
            net_fd = NET_FD if net_fd is not None and prepared is not None else None
            _quiet_stdio()
            if chan_ready is not None and chan_ready.fileno() == CHANNEL_FD:
                chan = chan_ready  # settling kept its number (a close and dup2 onto the same slot)
            else:
                chan = Channel(socket.socket(fileno=CHANNEL_FD))
    except BaseException as exc:
        os._exit(_failed(chan, exc))
    Made(cls, chan, prepared, grants, net_fd).serve()


def _become(
    cls: type[Worker], chan: Channel, prepared: Any, grants: Sequence[tuple[str, int, int, Rights]],
    net_fd: int | None,
) -> tuple[Worker, dict[str, Any], _Listener | None]:
    """Make the worker: its instance, ``setup()``, then sandbox entry (when
    ``prepared``). The channel is on CHANNEL_FD and grant i on GRANT_BASE + i."""
    keep = [CHANNEL_FD, *(GRANT_BASE + i for i in range(len(grants))), *captured_fds(),
            *([_lifeline.slot] if _lifeline.slot >= 0 else [])]
    sys.stdout, sys.stderr = _take_streams()  # never the real fds (setup()'s prints included)
    instance = cls()
    instance.broker = output.client = BrokerClient(chan)
    instance.grants = {
        name: FdDirectory(GRANT_BASE + i, rights, pinned=True)
        if kind == KIND_DIR
        else open_fd(GRANT_BASE + i, rights, kind, pinned=True)
        for i, (name, _, kind, rights) in enumerate(grants)
    }
    instance.setup()
    _close_all_but([0, 1, 2, *keep, *([] if net_fd is None else [net_fd])])
    report: dict[str, Any] = {"layers": []}
    notify = None
    _freeze_linecache(cls)
    _python_hooks()
    if prepared is not None:
        from .sandbox import enter

        applied = enter(prepared, [0, 1, 2, *keep], net_fd=net_fd)
        report = dict(applied)
        nfd = report.pop("notify_fd", None)
        if nfd is not None:
            notify = _Listener(nfd)
    return instance, report, notify


def _announce_and_serve(chan: Channel, instance: Worker, report: dict[str, Any], notify: _Listener | None) -> None:
    err = output.captured.get("stderr")
    # The read end of its stderr pipe goes to the broker too, which reads what is left in it when the
    # worker dies (a fatal error's report, faulthandler's traceback): this process can no longer.
    chan.send({"t": "ready", "v": PROTOCOL_VERSION, "pid": os.getpid(), "sandbox": report, "notify": notify,
               "err": None if err is None else _StderrEnd(err)})
    if notify is not None:
        notify.close()  # the supervisor's fd must never stay with the supervised
    serve(instance, chan)


def _failed(chan: Channel | None, exc: BaseException) -> int:
    """Tell the broker why the worker could not start or went wrong; the exit code."""
    if chan is not None:
        try:
            chan.send({"t": "fail", "e": exception_to_wire(exc)})
        except BaseException:
            pass
    else:  # no channel yet: stderr is still the broker's
        try:
            os.write(
                2,
                (
                    "privsep worker failed before its channel was up:\n"
                    + "".join(__import__("traceback").format_exception(exc))
                ).encode(),
            )
        except OSError:
            pass
    return EXIT_SETUP_FAILED


_waited = False
_streams: tuple[Output, Output] | None = None


def while_waiting() -> None:
    """What a spare does for any worker while it waits for its request: stdio
    goes to /dev/null, and the objects and module entries every worker's start
    writes are made or touched now (after a fork, each first write to a page
    costs a copy-on-write fault, about 2 us here)."""
    global _waited, _streams
    import linecache

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_stdio()
    _streams = _new_streams()
    linecache.getlines = linecache.getlines  # the entries _freeze_linecache replaces
    linecache.checkcache = linecache.checkcache
    threading.excepthook = threading.excepthook  # and those _python_hooks replaces
    sys.unraisablehook = sys.unraisablehook
    warnings.showwarning = warnings.showwarning
    _waited = True


def _new_streams() -> tuple[Output, Output]:
    """The worker's sys.stdout and sys.stderr (see worker._output)."""
    return Output("stdout"), Output("stderr")


def _take_streams() -> tuple[Output, Output]:
    global _streams
    streams, _streams = _streams, None
    return streams if streams is not None else _new_streams()


def _python_hooks() -> None:
    """Python's default hooks for an exception in a thread and for one it
    cannot raise (a failing ``__del__``) print tracebacks in C, reading each
    source file from disk: in the sandbox that open is a violation, and the
    worker was killed for a thread's exception. These print the same through
    ``traceback``, whose lines come from the frozen line cache; warnings are
    printed without the late import of ``tracemalloc``. Hooks the worker set
    itself are left alone."""
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _thread_excepthook
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _unraisablehook
    if getattr(warnings.showwarning, "__module__", None) == "warnings":
        warnings.showwarning = _showwarning


def _showwarning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
    line: str | None = None,
) -> None:
    """Python's own printer imports ``tracemalloc`` for a warning that names
    its source (a coroutine never awaited, an unclosed file): an import in
    the sandbox, and a violation. This prints the same without it."""
    out = sys.stderr if file is None else file
    if out is None:
        return
    try:
        out.write(warnings.formatwarning(message, category, filename, lineno, line))
    except OSError:
        pass


# Neither hook may raise: Python reports a hook's own failure (a MemoryError
# near RLIMIT_AS, say) with its default printer, which reads source files,
# and in the sandbox that read is a violation.
def _thread_excepthook(args: Any) -> None:
    import traceback

    if args.exc_type is SystemExit:
        return
    try:
        name = args.thread.name if args.thread is not None else threading.get_ident()
        print(f"Exception in thread {name}:", file=sys.stderr)
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback, file=sys.stderr)
    except BaseException:
        pass


def _unraisablehook(unraisable: Any) -> None:
    import traceback

    try:
        try:
            what = repr(unraisable.object)
        except Exception:
            what = f"<{type(unraisable.object).__name__} object>"
        print(f"{unraisable.err_msg or 'Exception ignored in'}: {what}", file=sys.stderr)
        traceback.print_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback,
                                  file=sys.stderr)
    except BaseException:
        pass


class Made:
    """A worker made: set up and, when sandboxed, in its sandbox; or what
    ``setup()`` or entry raised, to report when it is to serve. A spare makes
    one ahead of its spawn request (``Worker.setup_ahead``); every other
    worker right before it serves."""

    __slots__ = ("chan", "error", "made")

    def __init__(
        self, cls: type[Worker], chan: Channel, prepared: Any, grants: Sequence[tuple[str, int, int, Rights]] = (),
        net_fd: int | None = None, *, ahead: bool = False,
    ):
        self.chan = chan
        self.made: tuple[Worker, dict[str, Any], _Listener | None] | None = None
        self.error: BaseException | None = None
        chan.allow_dirref = True
        try:
            instance, report, notify = _become(cls, chan, prepared, grants, net_fd)
            if ahead:
                report["ahead"] = True
            self.made = instance, report, notify
        except BaseException as exc:
            self.error = exc

    def serve(self) -> NoReturn:
        """Announce the worker and answer calls; or report why it failed. Never returns."""
        code = 0
        try:
            if self.made is None:
                assert self.error is not None
                raise self.error
            _announce_and_serve(self.chan, *self.made)
        except BrokerGone:
            code = 0
        except BaseException as exc:
            code = _failed(self.chan, exc)
        finally:
            os._exit(code)


_warmed: set[type] = set()


def warm_linecache(cls: type[Worker]) -> None:
    """Read the worker's own source files into the line cache, so tracebacks
    show them after the sandbox is on. The zygote does this once per class,
    before forking."""
    if cls in _warmed:
        return
    import inspect
    import linecache

    if not _warmed:  # privsep's own lines a worker's traceback passes through (self.broker.open, ...)
        from protocol import _errors, _paths

        from . import _client, _files

        for module in (_client, _files, sys.modules[__name__], _paths, _errors):
            if module.__file__:
                linecache.getlines(module.__file__)
    for klass in cls.__mro__:
        try:
            path = inspect.getsourcefile(klass)
        except (TypeError, OSError):
            continue
        if path and path not in _redacted:
            linecache.getlines(path)
            _redact(path)
    _warmed.add(cls)


_redacted: set[str] = set()


def _redact(path: str) -> None:
    """Keep in the cache only the lines of the file's functions and classes
    (what a traceback in a worker can point at): every worker forked later
    inherits the cache, and a main script's ``if __name__ == "__main__":``
    block, which the zygote never runs, is no business of theirs."""
    import ast
    import linecache

    _redacted.add(path)
    entry = linecache.cache.get(path)
    if entry is None or len(entry) != 4:
        return
    size, mtime, lines, fullname = entry
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        linecache.cache.pop(path, None)  # nothing known to keep
        return
    keep = [False] * (len(lines) + 1)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.end_lineno:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            for n in range(first, node.end_lineno + 1):
                keep[n] = True
    kept = [line if keep[i] else "\n" for i, line in enumerate(lines, 1)]
    linecache.cache[path] = (size, mtime, kept, fullname)


def _freeze_linecache(cls: type[Worker]) -> None:
    """Tracebacks must not read source files once the sandbox is on: serve
    lines from memory only."""
    import linecache

    warm_linecache(cls)
    linecache.getlines = _cached_lines
    linecache.checkcache = _no_check


def _cached_lines(filename: str, module_globals: Any = None) -> list[str]:
    import linecache

    entry = linecache.cache.get(filename)
    return list(entry[2]) if entry is not None and len(entry) > 2 else []


def _no_check(filename: str | None = None) -> None:
    return None


class _StderrEnd:
    """A copy of the stderr pipe's read end, for the broker (this process keeps its own)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __privsep_fd__(self) -> tuple[int, int, Any]:
        from protocol import Rights
        from protocol._wire import KIND_STREAM

        return self.fd, KIND_STREAM, Rights.READ


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
