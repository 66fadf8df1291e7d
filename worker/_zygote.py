"""The zygote: a clean, single-threaded process started by exec.

It imports worker classes once, prepares each sandbox once (the seccomp
filter is compiled here, before any fork) and forks a worker per request
(or, usually, a spare ahead of time: below). It holds no grants: its only
fds are its two channels to the broker, the read end of the broker's
lifeline pipe and, briefly, each new worker's channel end and network
namespace. It reaps its children only when the broker asks, so a pid is
never reused while the broker still refers to it.

On request it forks a **spare**: a child that holds nothing but one end of
a fresh socketpair, whose other end goes to the broker with the spare's
pid. The broker later sends the spare its spawn request (class, sandbox
spec, grants) over that socket, which then becomes the worker's channel;
Android's zygote keeps such "unspecialized app processes" for the same
reason. The fork, the child's first page faults and one message hop then
happen between spawns instead of during one. The broker names the class and
spec it expects next, so the zygote imports and compiles them before the
fork and the spare inherits them; a spare handed something else loads it
itself. When that class promises its ``setup()`` stays in the process
(``Worker.setup_ahead``, or no ``__init__``/``setup`` of its own) and the
spec pins no fds, the spare makes the whole worker while it waits: instance,
``setup()``, sandbox entry. It then serves exactly that request (class,
spec, no grants) and refuses any other; the broker lets it go instead.
Where workers get a memory cgroup, the broker makes one for each spare and
the spare moves itself in first thing, so what its ``setup()`` touches is
charged there and no spawn waits for the move. Where the broker may raise
priorities again, it lowers us to SCHED_IDLE before it asks for a spare;
we come back once it is made, and the spare, forked meanwhile, waits at
SCHED_IDLE until the broker raises it (``worker._priority``). Once the
broker has learned which of our pages a class's workers write as they start
(``broker._pagemap``), it names them with each spare request for that class,
and the spare writes them while it waits (``worker._prefault``).

A class from the broker's main script is named by the script's path (or the
module it was run as) and imported here like ``multiprocessing``'s
forkserver imports it (``worker._mainref``); the broker first asks for that
import on its own ("load"), so a script that cannot be imported here is
found out before any spawn depends on it.

Run as ``python3 -m worker._zygote FD [--spares FD] [--lifeline FD] [--exec]
[--pdeathsig]``. With ``--exec`` it serves exactly one spawn request by
becoming that worker (the "fresh interpreter" spawn method). With
``--lifeline``, the read end of a lifeline pipe of the broker's: each child
it forks (or, with ``--exec``, the worker it becomes) arms its own from it,
and dies the moment the broker does, with what it forks, without waiting
for the zygote to finish dying (``worker._lifeline``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import sys
from typing import Any, NoReturn

import msgpack

from protocol import ProtocolError, Rights
from protocol._remote import exception_to_wire
from protocol._wire import Channel, ReceivedFd, SocketEnd, seqpacket_pair

from . import _lifeline
from ._importpath import adopt_import_path
from ._mainref import allow_main_only, import_ref
from ._prefault import populate, ranges_of
from ._preload import preload
from ._priority import Background, may_raise
from ._rpc import Worker
from ._serve import (
    CHANNEL_FD,
    EXIT_PROTOCOL,
    EXIT_SETUP_FAILED,
    NET_FD,
    Made,
    _close_all_but,
    _settle_fds,
    child_main,
    warm_linecache,
    while_waiting,
)
from .sandbox._libc import PR_SET_PDEATHSIG, prctl
from .sandbox._namespaces import fresh_net, write_file
from .sandbox._spec import SandboxSpec

_classes: dict[tuple[str, str], type[Worker]] = {}
#: our end of the broker's lifeline pipe, from which each child arms its own (worker._lifeline)
_lifeline_fd: int | None = None
_prepared: dict[Any, Any] = {}


def load_class(module: str, qualname: str) -> type[Worker]:
    key = (module, qualname)
    cls = _classes.get(key)
    if cls is None:
        obj: Any = import_ref(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, Worker)):
            raise TypeError(f"{module}.{qualname} is not a Worker subclass")
        warm_linecache(obj)
        cls = _classes[key] = obj
    return cls


_prepared_by_wire: dict[bytes, Any] = {}


def prepared_for(spec_wire: Any) -> Any:
    if spec_wire is None:
        return None
    key = msgpack.packb(spec_wire)  # the spec as sent: parsing and checking it again is the slow part
    got = _prepared_by_wire.get(key)
    if got is None:
        spec = SandboxSpec.from_wire(spec_wire)
        if spec not in _prepared:
            from .sandbox import prepare

            _prepared[spec] = prepare(spec)
        got = _prepared_by_wire[key] = _prepared[spec]
    return got


_NUMBER = {"n"}  # a request's number, given back with its answer: see ``serve``


def _check_spawn(
    msg: Any, *, with_chan: bool = True
) -> tuple[str, str, Any, ReceivedFd | None, list[tuple[str, ReceivedFd, int, Rights]]]:
    """A spawn request: from the broker to the zygote (with the worker's channel
    end) or to a spare (whose own socket is the channel)."""
    keys = {"t", "module", "qualname", "spec", "grants", *(("chan",) if with_chan else ())}
    if (
        type(msg) is not dict
        or msg.get("t") != "spawn"
        or set(msg) - _NUMBER != keys
        or not isinstance(msg["module"], str)
        or not isinstance(msg["qualname"], str)
        or (with_chan and not isinstance(msg["chan"], ReceivedFd))
        or not isinstance(msg["grants"], list)
    ):
        raise ProtocolError("bad spawn request")
    grants = []
    for g in msg["grants"]:
        if not (isinstance(g, list) and len(g) == 2 and isinstance(g[0], str) and isinstance(g[1], ReceivedFd)):
            raise ProtocolError("bad grant in spawn request")
        grants.append((g[0], g[1], g[1].kind, g[1].rights))
    return msg["module"], msg["qualname"], msg["spec"], msg.get("chan"), grants


class _AheadPlan:
    """What a spare makes ahead of its request: the worker of ``cls`` under
    ``prepared``, for exactly that request (module, qualname, spec as sent)."""

    __slots__ = ("cls", "module", "prepared", "qualname", "spec_key")

    def __init__(self, cls: type[Worker], prepared: Any, module: str, qualname: str, spec_wire: Any):
        self.cls, self.prepared = cls, prepared
        self.module, self.qualname = module, qualname
        self.spec_key = msgpack.packb(spec_wire)

    def matches(self, module: str, qualname: str, spec_wire: Any, grants: list[Any]) -> bool:
        return (
            not grants
            and (module, qualname) == (self.module, self.qualname)
            and msgpack.packb(spec_wire) == self.spec_key
        )


def _ahead_allowed(cls: type[Worker], prepared: Any) -> bool:
    """May a spare make this worker before it is asked for? Only if nothing of
    the user's runs ahead but what promises to stay in the process, and the
    sandbox pins no fds (those come with the request)."""
    if prepared is not None and (prepared.spec.fs_rules or prepared.spec.fd_rules):
        return False
    if cls.setup_ahead is True:
        return True
    return cls.setup is Worker.setup and cls.__init__ is Worker.__init__


def _fork_spare(
    ctls: list[Channel], want_net: bool, ahead: _AheadPlan | None = None, cgroup_procs: str | None = None,
    touch: list[tuple[int, int]] | None = None,
) -> tuple[int, socket.socket]:
    """Fork a spare, with a fresh network namespace for it to join at entry
    if ``want_net`` and we may make one; returns its pid and the broker's end
    of its socket. With ``ahead`` the spare makes that worker while it waits.
    With ``cgroup_procs`` it first moves itself into that cgroup. ``touch``:
    the pages its worker will write as it starts (see worker._prefault). It
    inherits our scheduling policy (SCHED_IDLE when the broker lowered us)."""
    net_fd = fresh_net() if want_net else None
    try:
        ours, theirs = seqpacket_pair()
        me = os.getpid()
        gc.freeze()  # inherited objects stay out of the child's collector: fewer copy-on-write faults
        try:
            pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            try:
                for c in ctls:  # the zygote's channels to the broker, and their buffers
                    c.close()
                ours.close()
                _spare_main(theirs, me, net_fd, ahead, cgroup_procs, touch)  # takes over net_fd; never returns
            finally:
                os._exit(70)  # ends the child here: the finally below is the parent's
    finally:
        if net_fd is not None:
            os.close(net_fd)  # the spare has its own copy
    theirs.close()
    return pid, ours


def _spare_main(
    sock: socket.socket, zygote: int, net_fd: int | None, ahead: _AheadPlan | None = None,
    cgroup_procs: str | None = None, touch: list[tuple[int, int]] | None = None,
) -> NoReturn:
    """A spare waits, holding nothing, for the one spawn request it will serve;
    its socket then becomes the worker's channel."""
    # A process group of its own now, as child_main makes one: a worker made
    # ahead here never passes through child_main, and what it forks must die
    # with it (the broker kills the group).
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote:
        os._exit(0)
    lifeline = None if _lifeline_fd is None else _lifeline.arm(_lifeline_fd)
    if cgroup_procs is not None:
        # Into the worker's memory cgroup now, before it touches memory: a move
        # can wait for the kernel's cgroup lock (an RCU grace period, ~10 ms
        # here), which then delays no spawn. The broker checks it took.
        with contextlib.suppress(OSError):
            write_file(cgroup_procs, str(os.getpid()))
    if touch:  # after the move: the copies are the worker's memory, charged to its cgroup
        asked = select.poll()
        asked.register(sock.fileno(), select.POLLIN)
        populate(touch, lambda: bool(asked.poll(0)))
    # While waiting, do what does not depend on the request: the socket goes to
    # the worker's channel slot (and the namespace fd to its own), and the
    # worker's Channel is made; with a plan, the whole worker is.
    _settle_fds(sock.detach(), [], net_fd, lifeline)
    net_fd = None if net_fd is None else NET_FD
    chan = Channel(socket.socket(fileno=CHANNEL_FD))
    while_waiting()
    made = None
    if ahead is not None:
        made = Made(ahead.cls, chan, ahead.prepared, (), net_fd if ahead.prepared is not None else None, ahead=True)
    try:
        msg = chan.recv()
    except ProtocolError:
        os._exit(EXIT_PROTOCOL)
    if msg is None:  # the broker let it go
        os._exit(0)
    try:
        module, qualname, spec, _, grant_fds = _check_spawn(msg, with_chan=False)
        if made is not None:
            assert ahead is not None
            if not ahead.matches(module, qualname, spec, grant_fds):  # the broker checks this too
                raise ProtocolError(f"this spare was made for {ahead.module}.{ahead.qualname} without grants")
        else:
            cls = load_class(module, qualname)
            prepared = prepared_for(spec)
    except BaseException as exc:
        chan.send({"t": "fail", "e": exception_to_wire(exc)})
        os._exit(EXIT_SETUP_FAILED)
    if made is not None:
        made.serve()
    grants = [(name, g.fd, kind, rights) for name, g, kind, rights in grant_fds]
    child_main(cls, CHANNEL_FD, prepared, grants, pdeathsig=True, parent_pid=zygote, net_fd=net_fd,
               chan_ready=chan)


def _preload(msg: dict[str, Any]) -> tuple[bool, _AheadPlan | None]:
    """Import the class and compile the filter the broker expects next, so the
    spare inherits both. Failure is left for the spare to report when used.
    Returns whether the spare will likely want a network namespace (a
    sandboxed spec with namespaces, or nothing known yet), and the plan for
    making the worker ahead, where the class allows it."""
    pre = msg.get("preload")
    if not (isinstance(pre, list) and len(pre) == 3 and isinstance(pre[0], str) and isinstance(pre[1], str)):
        return True, None
    try:
        cls = load_class(pre[0], pre[1])
        prepared = prepared_for(pre[2])
    except BaseException:  # a module's sys.exit() at import too: the zygote goes on
        return True, None
    plan = _AheadPlan(cls, prepared, pre[0], pre[1], pre[2]) if _ahead_allowed(cls, prepared) else None
    return prepared is not None and prepared.spec.namespaces, plan


def _cgroup_procs(msg: dict[str, Any]) -> str | None:
    """The cgroup.procs file a spare is to move itself into, if the broker made one."""
    path = msg.get("cgroup")
    if isinstance(path, str) and os.path.isabs(path) and os.path.basename(path) == "cgroup.procs":
        return path
    return None


def serve(chan: Channel, *, once: bool, pdeathsig: bool, spares: Channel | None = None) -> None:
    """Answer the broker: spawn and reap requests on ``chan``; spare requests
    are answered on ``spares`` when given (else on ``chan``). Each answer
    carries its request's number ``n``, when it has one: a broker call
    interrupted (a Ctrl-C) between its request and the answer leaves that
    answer unread, and the broker must not take it for a later request's."""
    spare_out = spares or chan
    me = os.getpid()
    may_idle = may_raise()  # else the broker must not lower us: we could not come back
    while True:
        msg = chan.recv()
        if msg is None:
            return
        n = msg.get("n") if type(msg) is dict else None
        tag = {"n": n} if type(n) is int else {}
        if type(msg) is dict and msg.get("t") == "reap" and isinstance(msg.get("pid"), int):
            try:
                _, status = os.waitpid(msg["pid"], 0)
                chan.send({"t": "status", "pid": msg["pid"], "status": status, **tag})
            except ChildProcessError:
                chan.send({"t": "status", "pid": msg["pid"], "status": None, **tag})
            continue
        if type(msg) is dict and msg.get("t") == "load" and isinstance(msg.get("module"), str) \
                and isinstance(msg.get("qualname"), str):
            try:  # the broker asks before it first relies on a class from its main script
                load_class(msg["module"], msg["qualname"])
                chan.send({"t": "loaded", **tag})
            except BaseException as exc:  # SystemExit too: a script's sys.exit() must not end the zygote
                chan.send({"t": "error", "e": exception_to_wire(exc), **tag})
            continue
        if type(msg) is dict and msg.get("t") == "spare" and not once:
            # At background priority where the broker lowered us (see worker._priority).
            forked: tuple[int, socket.socket] | OSError
            with Background(may_idle and msg.get("idle") is True) as bg:
                want_net, plan = _preload(msg)
                try:
                    forked = _fork_spare([chan, *([spares] if spares else [])], want_net, plan, _cgroup_procs(msg),
                                         ranges_of(msg.get("touch")))
                except OSError as exc:
                    forked = exc
            if isinstance(forked, OSError):
                spare_out.send({"t": "error", "e": exception_to_wire(forked), **tag})
                continue
            pid, sock = forked
            try:
                spare_out.send({"t": "spare", "pid": pid, "chan": SocketEnd(sock), "ahead": plan is not None,
                                "idle": bg.enabled, **tag})
            finally:
                sock.close()
            continue
        module, qualname, spec, rfd, grant_fds = _check_spawn(msg)
        assert rfd is not None
        grants = [(name, g.fd, kind, rights) for name, g, kind, rights in grant_fds]
        try:
            cls = load_class(module, qualname)
            prepared = prepared_for(spec)
        except BaseException as exc:  # a module's sys.exit() at import too: the zygote goes on
            _let_go(rfd, grant_fds)
            chan.send({"t": "error", "e": exception_to_wire(exc), **tag})
            continue
        if once:
            fd = rfd.detach()
            chan.send({"t": "spawned", "pid": me})
            ctl = chan.sock.detach()
            os.close(ctl)
            child_main(cls, fd, prepared, grants, pdeathsig=pdeathsig, parent_pid=os.getppid(), lifeline=_lifeline_fd)
        gc.freeze()  # inherited objects stay out of the child's collector: fewer copy-on-write faults
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN at a process limit, ENOMEM: this spawn fails, we and our workers go on
            _let_go(rfd, grant_fds)
            failed = OSError(exc.errno, f"the zygote cannot fork: {exc.strerror}")
            chan.send({"t": "error", "e": exception_to_wire(failed), **tag})
            continue
        if pid == 0:
            try:
                fd = rfd.detach()
                chan.close()  # (its buffer too)
                if spares is not None:
                    spares.close()
                child_main(cls, fd, prepared, grants, pdeathsig=True, parent_pid=me, lifeline=_lifeline_fd)
            finally:
                os._exit(70)
        _let_go(rfd, grant_fds)
        chan.send({"t": "spawned", "pid": pid, **tag})


def _let_go(rfd: ReceivedFd, grant_fds: list[tuple[str, ReceivedFd, int, Rights]]) -> None:
    """Close our copies of a spawn request's fds: the worker has its own, or none was made."""
    rfd.close()
    for _, g, _, _ in grant_fds:
        g.close()


def main(argv: list[str]) -> None:
    global _lifeline_fd
    adopt_import_path()  # (before the program's modules: the main script's, the classes')
    fd = int(argv[0])
    if "--main-refs" in argv:  # the broker's main script, the only one this zygote may load
        start = argv.index("--main-refs") + 1
        allow_main_only(argv[start:argv.index("--", start)])
    spare_fd = int(argv[argv.index("--spares") + 1]) if "--spares" in argv else None
    _lifeline_fd = int(argv[argv.index("--lifeline") + 1]) if "--lifeline" in argv else None
    if "--pdeathsig" in argv:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A broker that ignores SIGCHLD (servers do, to have children reaped for them) passes that on
    # through exec; the zygote must reap its workers itself to report how each one ended.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # nor does a signal mask of the broker's thread hold here
    _close_all_but([0, 1, 2, fd, *(x for x in (spare_fd, _lifeline_fd) if x is not None)])
    preload()  # before any worker is forked: each inherits what it imported
    chan = Channel(socket.socket(fileno=fd))
    spares = None if spare_fd is None else Channel(socket.socket(fileno=spare_fd))
    try:
        serve(chan, once="--exec" in argv, pdeathsig="--pdeathsig" in argv, spares=spares)
    finally:
        # The broker is gone; our workers die with us (their parent-death signal).
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
