"""Spawning workers through a zygote (or a fresh interpreter per worker).

The zygote is started by exec, never forked from the broker, so it starts
single-threaded and small whatever the broker is running. It must find each
worker class by name: a class in an importable module, or in the main
script, which the zygote imports the way ``multiprocessing``'s forkserver
does (see ``worker._mainref``); not one defined inside a function, or in a
main module that is no file. ``Broker(spawn="auto")`` forks the broker for
those, and for a main script the zygote cannot import.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from protocol import ProtocolError, WorkerCrashed
from protocol._remote import exception_from_wire
from protocol._wire import DEFAULT_SEND_TIMEOUT, Channel, ReceivedFd, SocketEnd, seqpacket_pair
from worker import Worker
from worker._mainref import main_refs, module_ref
from worker._priority import cpu_state, may_raise, parent_of, process_to_foreground, to_background, to_foreground

from ._cgroup import WorkerCgroup
from ._exit import WorkerExit, returncode_text
from ._idle_watch import idle_watch
from ._interp import child_env, interpreter
from ._lifeline import Lifeline, new_lifeline
from ._loop import readable
from ._pagemap import asleep, owned, writable
from ._parent import as_parent

log = logging.getLogger("privsep.broker")

SPAWN_METHODS = ("auto", "zygote", "fork", "exec")
_LEARNED_KEEP = 16  # (class, spec) pairs whose start-up pages are kept
_BOOT_TIMEOUT = 10.0  # a zygote that crashes at boot closes its end at once; one that hangs is found by the first spawn
#: How often the idle watch looks at a zygote making a spare at SCHED_IDLE
#: (then at the spare), while the answer is unread: one that is runnable and
#: got less than ``_FAIR_SHARE`` of a CPU since the last look is starved, and
#: raised. (Making a spare takes 1-3 ms of CPU.)
_STARVED_AFTER = 0.05
_FAIR_SHARE = 0.1
_BLOCKED_MAX = 1.0  # s: one found blocked (a setup() asleep) is looked at again after twice as long, up to this
#: s: the last look at a spare request still unread comes this long after it
#: asked, and raises what is still at SCHED_IDLE whatever it is doing (a
#: setup() made ahead that sleeps longer than this before it computes): by
#: then the spawn that asked is long done, and the looks must end.
_CHECK_FOR = 10.0


def importable(cls: type[Worker]) -> bool:
    """Can another interpreter find ``cls`` by name (see ``worker._mainref``)?"""
    return module_ref(cls) is not None


def _ref(cls: type[Worker]) -> str:
    ref = module_ref(cls)
    if ref is None:
        raise TypeError(f"{cls.__qualname__} cannot be found by name in another interpreter")
    return ref


def _start(
    extra: list[str], with_spares: bool = False, environ: dict[str, str] | None = None,
    lifeline: int | None = None,
) -> tuple[subprocess.Popen[bytes], Channel, Channel | None, Lifeline | None]:
    """Exec a zygote. With ``with_spares`` (a zygote that forks workers), a
    second channel carries the answers to spare requests alone, so they
    never sit between the broker and the answer to anything else, and the
    zygote gets a lifeline of its own, returned (``worker._lifeline``).
    Else (``--exec``: it becomes the worker) it arms itself from
    ``lifeline``, a read end the broker keeps."""
    ours, theirs = seqpacket_pair()
    args = interpreter("worker._zygote", str(theirs.fileno()), *extra, "--main-refs", *main_refs(), "--")
    passed = [theirs]
    spares = own = None
    if with_spares:
        spares, spares_theirs = seqpacket_pair()
        args += ["--spares", str(spares_theirs.fileno())]
        passed.append(spares_theirs)
        own = new_lifeline()
        if own is not None:
            lifeline = own.read_end()
    if lifeline is not None:
        args += ["--lifeline", str(lifeline)]
    args.append("--pdeathsig")  # (started by as_parent: from a thread that lives as long as this process)
    try:
        proc = as_parent(lambda: subprocess.Popen(
            args,
            pass_fds=[s.fileno() for s in passed] + ([] if lifeline is None else [lifeline]),
            stdin=subprocess.DEVNULL,
            env=child_env(environ),  # it imports what the broker imports
            close_fds=True,
            # Out of the broker's process group: a Ctrl-C at the terminal is the broker's to
            # handle (it ends the zygote); reaching a zygote still importing, it printed a traceback.
            process_group=0,
        ))
    except BaseException:
        ours.close()
        if spares is not None:
            spares.close()
        if own is not None:
            own.close()
        raise
    finally:
        for s in passed:
            s.close()
        if own is not None:
            own.drop_read_end()  # (the zygote's now)
    return (proc, Channel(ours, send_timeout=30.0), None if spares is None else Channel(spares, send_timeout=30.0),
            own)


def _request_spawn(
    chan: Channel, cls: type[Worker], spec_wire: Any, timeout: float, grants: list[tuple[str, Any]],
    sent: Callable[[], None] | None = None,
    on_timeout: Callable[[], bool] | None = None,
    died: Callable[[], bool] | None = None,
    numbered: tuple[int, Callable[[Any], None]] | None = None,
) -> tuple[int, socket.socket]:
    """``sent()`` runs once the request is on its way (before the wait);
    ``on_timeout()`` if no answer came in time: it ends the zygote, and says
    whether it had died by itself; ``died()`` says whether the zygote has
    died, ending the wait then. ``numbered``: the request's number and what
    to do with an earlier request's answer met on the way (``_answer``)."""
    parent, child = seqpacket_pair()
    msg = {
        "t": "spawn",
        "module": _ref(cls),
        "qualname": cls.__qualname__,
        "spec": spec_wire,
        "chan": SocketEnd(child),
        "grants": [[name, cap] for name, cap in grants],
    }
    if numbered is not None:
        msg["n"] = numbered[0]
    try:
        try:
            chan.send(msg)
        except (BrokenPipeError, ConnectionResetError) as exc:  # it died since it was last seen alive
            raise _zygote_gone() from exc
        finally:
            child.close()
        if sent is not None:
            sent()
        try:
            reply = _answer(chan, timeout, died, numbered)
        except OSError as exc:  # ECONNRESET: it died with the request unread (a red team: 2 spawns in 100)
            raise _zygote_gone() from exc
        if reply is _UNANSWERED:
            if on_timeout is not None and on_timeout():  # (ended: its late answer would be the next's)
                raise _zygote_gone()
            why = f"zygote did not answer a spawn request within {timeout:g} s"
            raise WorkerCrashed(why, WorkerExit("crashed", why))
    except BaseException:
        # (a Ctrl-C too: a worker made for an answer left unread gets EOF, and is ended
        # when that answer is read: see Zygote._stale)
        parent.close()
        raise
    if reply is None:
        parent.close()
        raise _zygote_gone()
    if type(reply) is dict and reply.get("t") == "spawned" and isinstance(reply.get("pid"), int):
        return reply["pid"], parent
    parent.close()
    if type(reply) is dict and reply.get("t") == "error" and isinstance(reply.get("e"), dict):
        cause = exception_from_wire(reply["e"])
        why = f"cannot start {cls.__qualname__}: {cause}"
        raise WorkerCrashed(why, WorkerExit("crashed", why)) from cause
    raise ProtocolError("zygote sent a malformed reply")


_UNANSWERED: Any = object()  # (no answer within the time given)


def _answer(
    chan: Channel, timeout: float, died: Callable[[], bool] | None,
    numbered: tuple[int, Callable[[Any], None]] | None = None,
) -> Any:
    """The answer on ``chan`` (None at EOF), or ``_UNANSWERED`` if none came
    within ``timeout`` (see ``_answer_within``). With ``numbered`` (n,
    stale): the answer numbered ``n``; one to an earlier request, left
    unread by a broker call that was interrupted (a Ctrl-C) while it
    waited, goes to ``stale()``. Taken for the next request's answer, it
    told a stop "exit status unknown" for good, and handed a spawn the pid
    of another worker."""
    deadline = time.monotonic() + timeout
    while True:
        if not _answer_within(chan, max(0.0, deadline - time.monotonic()), died):
            return _UNANSWERED
        reply = chan.recv()
        if numbered is None or type(reply) is not dict:
            return reply
        n, stale = numbered
        got = reply.get("n")
        if type(got) is not int or got >= n:
            return reply  # (ours; or malformed, which the caller says)
        stale(reply)


def _answer_within(chan: Channel, timeout: float, died: Callable[[], bool] | None) -> bool:
    """Wait up to ``timeout`` for the zygote's answer on ``chan``; False as
    soon as ``died()`` says it has died. Its channels then hang up, unless a
    spare it had just forked holds copies, not yet run to close them (at
    background priority, on busy CPUs): each reap of a worker of a dead
    zygote waited its 10 s, a spawn its spawn_timeout."""
    if died is None:
        return chan.wait_readable(timeout)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if chan.wait_readable(min(max(left, 0.0), 0.05)):
            return True
        if left <= 0 or died():
            return False


def _zygote_gone() -> WorkerCrashed:
    why = "the zygote has exited (the next spawn starts a new one)"
    return WorkerCrashed(why, WorkerExit("crashed", why))


def _kill_child_of(zygote: subprocess.Popen[bytes], pid: int, foreground: bool = False) -> None:
    """SIGKILL the zygote's child ``pid``, never a stranger that reused the pid.
    The zygote reaps a child only when the broker asks, so while it lives the
    pid stays its child's: the pidfd is opened first, and used only if the
    zygote is still alive after that. A dead zygote's children got the
    parent-death signal already. ``foreground``: first back to normal
    priority (a spare waiting at SCHED_IDLE), so that it dies now: killed at
    background priority on busy CPUs, it took seconds to run to its end,
    which the zygote's reap waited for (10 s with 12 busy tasks a CPU, and
    the zygote was ended, its workers with it)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd_open here: the liveness check alone
        if zygote.poll() is None:
            _to_foreground_to_die(pid, foreground)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return
    try:
        if zygote.poll() is None:
            _to_foreground_to_die(pid, foreground)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _to_foreground_to_die(pid: int, foreground: bool) -> None:
    if foreground:
        try:
            process_to_foreground(pid)  # (every thread: one made ahead may have started some)
        except OSError:
            pass  # gone, or the kernel refuses: it dies at the priority it has


class _Spare:
    """A pre-forked child of the zygote, waiting for its spawn request on ``chan``."""

    __slots__ = ("ahead", "cgroup", "chan", "pid", "preload")

    def __init__(
        self, pid: int, chan: Channel, ahead: tuple[str, str, Any] | None, cgroup: WorkerCgroup | None = None,
        preload: tuple[str, str, Any] | None = None,
    ):
        self.pid = pid
        self.chan = chan
        #: the (module, qualname, spec) the zygote was asked to preload for it
        self.preload = preload
        #: the (module, qualname, spec) it made its worker for while waiting
        #: (``Worker.setup_ahead``); it serves exactly that, without grants
        self.ahead = ahead
        #: the memory cgroup made for it, which it moved itself into first thing
        #: (owned here until the spare is handed out)
        self.cgroup = cgroup


class CannotImport(WorkerCrashed):
    """The zygote could not import a class's module (an error in it, or its
    top-level code ran past the spawn timeout): a fault of the script, not of
    the zygote."""


class Zygote:
    """The broker's side of one zygote process.

    It keeps one spare (see ``worker._zygote``) asked for ahead of time: a
    spawn sends its request straight to the spare, whose socket becomes the
    worker's channel, then asks the zygote for the next spare without
    waiting for the answer. That answer comes on a channel of its own and is
    read by the next spawn only, so between spawns the broker holds no spare
    fd (it waits in the channel's queue) and its fd count does not depend on
    whether a spare has arrived yet.

    Where workers get a memory cgroup (``spare_cgroup``), each spare is asked
    for with one made for it, and moves itself in while it waits: moving a
    process into a cgroup can wait for an RCU grace period (about 10 ms on
    this VM when no other move happened lately), which then delays no spawn.
    The broker checks at hand-out that the move took, and makes it if not.

    Where this process may raise a task's priority again (CAP_SYS_NICE),
    spares are made at SCHED_IDLE (see ``worker._priority``): each is moved
    back to SCHED_OTHER before it gets its request, and the zygote whenever
    the broker is to wait for it. A task at SCHED_IDLE does not run at all
    while its CPUs are kept busy: a broker and its worker taking turns on one
    CPU (a one-CPU container) never let the zygote make the spare, and there
    it waited runnable until the next spawn, for ever in a long run (which on
    this VM made each of their context switches dearer: a ping 20 -> 33 us).
    So while the answer is unread, the idle watch's thread looks at the
    zygote (then at the spare it made) every ``_STARVED_AFTER`` seconds and
    raises it if it is starved (``_unstarve``); one found blocked (a spare
    waiting for its request, or a ``setup()`` made ahead that sleeps before
    it computes) is looked at again less and less often. The last look,
    ``_CHECK_FOR`` after the request, raises whichever is still pending, so
    that a ``setup()`` asleep for longer does not starve once it computes.

    The first spare handed out for a (class, spec) it was made for teaches
    which inherited pages such a worker has made its own by the time it is
    ready (see ``_pagemap``); later spares for it are told to write them
    while they wait. That spawn asks for the next spare only once its worker
    is ready (``started``), so that the zygote's own writes do not add to
    the lesson.
    """

    def __init__(
        self, spare_cgroup: Callable[[], WorkerCgroup | None] | None = None, environ: dict[str, str] | None = None
    ) -> None:
        """``spare_cgroup`` makes a memory cgroup for each spare to move into
        while it waits (None where workers get none)."""
        self._spare_cgroup = spare_cgroup
        self._asked_cgroup: WorkerCgroup | None = None  # made for the pending spare
        self._proc, self._chan, spares, self._lifeline = _start([], with_spares=True, environ=environ)
        assert spares is not None
        self._spares = spares
        self._lock = threading.Lock()
        self._spare: _Spare | None = None
        self._pending = False  # a spare was asked for and the answer is not read yet
        self._asked: tuple[str, str, Any] | None = None  # what the pending spare was asked to preload
        self._idle = may_raise()  # spares made at background priority
        self._zygote_idles = False  # the zygote said it goes back to normal priority by itself
        self._asked_idle = False  # the pending spare was asked for at background priority
        self._asked_n = 0  # spare requests sent: which one a starvation check is for
        #: (the request number, its cancel) of the pending starvation check; its own lock, since a
        #: check that finds self._lock taken sets itself again without it
        self._check: tuple[int, Callable[[], None]] | None = None
        self._check_lock = threading.Lock()
        self._learned: list[tuple[tuple[str, str, Any], list[tuple[int, int]]]] = []
        self._learn = True  # pagemaps readable, so far
        #: (pid, what it was made for, its writable mappings before its request) of the worker learned from
        self._learning: tuple[int, tuple[str, str, Any], list[tuple[int, int]]] | None = None
        self._reap_within = 10.0  # (seconds) a reap's wait for the zygote's answer: see closing()
        self._n = 0  # the number of the last request sent (see _answer)
        self._spare_n = 0  # the number of the pending spare request
        #: exit statuses met in answers left unread (see _stale), for the reap asked again
        self._statuses: dict[int, int] = {}
        self._let_go: set[int] = set()  # spares and workers let go, whose status no one asks for again
        try:
            self._ask_spare(None)
            # Return once the zygote and its first spare exist (the answer is left
            # queued), so the broker's processes and fds are the same now as
            # between any two later spawns: what a soak test counts before and after.
            self._spares.wait_readable(_BOOT_TIMEOUT)
        except BaseException:
            # A Ctrl-C during Broker(): the zygote may not have set its parent-death signal
            # yet, and ran on, orphaned, 60-90 ms past the program's exit here, then was left
            # to init with its spare (a user trial, 12 of 12 runs). Its spare dies with it.
            self._proc.kill()
            self._proc.wait()
            self._chan.close()
            self._spares.close()
            if self._lifeline is not None:
                self._lifeline.close()
            raise

    def spawn(
        self,
        cls: type[Worker],
        spec_wire: Any,
        timeout: float,
        grants: list[tuple[str, Any]],
        before: Callable[[int, WorkerCgroup | None], None] | None = None,
        memory_limit: int | None = None,
    ) -> tuple[int, Channel]:
        """A new worker's pid and channel. ``before(pid, cgroup)`` runs before
        a spare is given its request (not when the zygote forks one on
        demand), with the memory cgroup the spare moved into, which the caller
        then owns. A spare whose cgroup has another limit than
        ``memory_limit`` is not used."""
        expect = (_ref(cls), cls.__qualname__, spec_wire)
        with self._lock:
            # Another spawn is still learning: the zygote will not stay idle
            # for it now. Let it go (this spawn asks for the next spare).
            self._learning = None
            self._collect(timeout)
            spare, self._spare = self._spare, None
            if spare is not None and (
                (spare.ahead is not None and (spare.ahead != expect or grants))
                or (spare.cgroup is not None and spare.cgroup.limit != memory_limit)
            ):
                self._discard(spare)  # made for another worker: fork this one on demand
                spare = None
            if spare is not None:
                try:
                    if before is not None:
                        before(spare.pid, spare.cgroup)
                    spare.cgroup = None  # the caller's now
                except BaseException:
                    self._discard(spare)
                    raise
                inherited = self._before_learning(spare, expect)
                if self._assign(spare, expect, grants):
                    if inherited is None:
                        self._ask_spare(expect)
                    else:  # the next spare once this worker is ready: see started()
                        self._learning = (spare.pid, expect, inherited)
                    spare.chan.send_timeout = DEFAULT_SEND_TIMEOUT  # from now on, a worker's channel
                    return spare.pid, spare.chan
            pid, sock = _request_spawn(self._chan, cls, spec_wire, timeout, grants, sent=self._hurry,
                                       on_timeout=self._end_unanswered, died=self._died,
                                       numbered=(self._number(), self._stale))
            self._ask_spare(expect)
            return pid, Channel(sock)

    def _touched(self, expect: tuple[str, str, Any] | None) -> list[tuple[int, int]] | None:
        for key, runs in self._learned:
            if key == expect:
                return runs
        return None

    def _before_learning(self, spare: _Spare, expect: tuple[str, str, Any]) -> list[tuple[int, int]] | None:
        """The spare's writable mappings, if its start is to be learned from:
        the first spare preloaded for ``expect`` (not one that made its worker
        ahead: it would teach every page of that, to be written again ahead,
        which made back-to-back spawns slower, not faster)."""
        if not self._learn or spare.ahead is not None or spare.preload != expect or self._touched(expect) is not None:
            return None
        try:
            return writable(spare.pid)
        except PermissionError as exc:
            self._learn = False
            log.debug("cannot read a spare's memory map (%s): spares will not write their start-up pages ahead", exc)
        except OSError:
            pass  # gone: the request will say so
        return None

    def started(self, pid: int, ok: bool) -> None:
        """The worker ``pid`` has answered its handshake (``ok``) or failed
        it. If it is the one being learned from: learn, then ask for the next
        spare (its spawn did not)."""
        learning = self._learning
        if learning is None or learning[0] != pid:
            return
        with self._lock:
            if self._learning is not learning:
                return  # let go by a later spawn, which asked for the next spare
            self._learning = None
            _, expect, inherited = learning
            if ok:  # one try per (class, spec): an empty lesson is kept too
                try:
                    asleep(pid)
                    runs = owned(pid, inherited)
                except OSError:  # it died meanwhile, or made itself undumpable in setup()
                    runs = None
                self._learned = [*self._learned[-(_LEARNED_KEEP - 1):], (expect, runs or [])]
            self._ask_spare(expect)

    def _wake(self, spare: _Spare) -> bool:
        """Normal priority for a spare about to get its request (it waited at
        SCHED_IDLE). Before the send, so that the request wakes a normal task:
        the kernel weighs whether a woken task preempts at the wake-up, and
        a task raised later, while queued, waits out the running task's slice
        (1-3 ms here). False (the spare is let go) if it is gone, or if the
        kernel refuses (never expected), when no later spare is made at
        background priority either."""
        if not self._idle:
            return True
        try:
            if spare.ahead is not None and spare.ahead[2] is None:
                # Unsandboxed and made ahead: its setup() may have started threads
                # (sandbox entry refuses a second thread; other spares ran no user code).
                process_to_foreground(spare.pid)
            else:
                to_foreground(spare.pid)  # one thread: no /proc listing (~40 us cold)
            return True
        except ProcessLookupError:
            pass
        except OSError as exc:
            log.warning("cannot raise a spare's priority (%s); spares are made at normal priority from now on", exc)
            self._idle = False
        self._discard(spare)
        return False

    def _hurry(self) -> None:
        """The broker is about to wait for the zygote: normal priority for
        whatever it is doing (a spare it makes at SCHED_IDLE). Only while the
        zygote is not reaped, so its pid is still its own."""
        if self._idle and self._proc.returncode is None:
            try:
                to_foreground(self._proc.pid)
            except OSError:
                pass  # gone: the wait says so

    def _assign(self, spare: _Spare, expect: tuple[str, str, Any], grants: list[tuple[str, Any]]) -> bool:
        module, qualname, spec_wire = expect
        msg = {"t": "spawn", "module": module, "qualname": qualname, "spec": spec_wire,
               "grants": [[name, cap] for name, cap in grants]}
        if not self._wake(spare):
            return False
        try:
            spare.chan.send(msg)
            return True
        except (OSError, ProtocolError):  # it died while waiting: let the zygote reap it, fork on demand
            self._discard(spare)
            return False

    def _discard(self, spare: _Spare) -> None:
        """End a spare that will not serve: it holds nothing of anyone's yet.
        Killed, not left to notice EOF, since one made ahead may still be in a
        long setup(); then reaped by the zygote."""
        spare.chan.close()
        _kill_child_of(self._proc, spare.pid, foreground=self._idle)
        self._reap_locked(spare.pid, self._reap_within, let_go=True)
        if spare.cgroup is not None:
            spare.cgroup.discard()

    def _ask_spare(self, preload: tuple[str, str, Any] | None) -> None:
        """Ask for the next spare (answer read later). Caller holds the lock or is __init__."""
        if self._pending:
            return
        msg: dict[str, Any] = {"t": "spare", "n": self._number()}
        self._spare_n = msg["n"]
        if preload is not None:
            msg["preload"] = list(preload)
            runs = self._touched(preload)
            if runs:
                msg["touch"] = [list(r) for r in runs]
        cgroup = self._spare_cgroup() if self._spare_cgroup is not None else None
        if cgroup is not None:
            msg["cgroup"] = cgroup.procs_file
        # Not for a spare with a cgroup: starved of CPU until the next spawn
        # raises it, it would start its move then, and that spawn would wait
        # for the kernel's cgroup lock (~10 ms) instead of a fork.
        idle = self._idle and cgroup is None
        lowered = False
        if idle:
            msg["idle"] = True
            if self._zygote_idles and self._proc.returncode is None:
                # Lowered before the request wakes it, so that it does not
                # preempt the spare just handed out (the usual wake-up
                # target: the CPU this spawn ran on). It rises again itself.
                try:
                    to_background(self._proc.pid)
                    lowered = True
                except OSError:
                    pass
        try:
            self._chan.send(msg)
        except OSError:
            if cgroup is not None:
                cgroup.discard()
            return  # the zygote is gone; the next request says so
        self._pending = True
        self._asked = preload
        self._asked_cgroup = cgroup
        self._asked_idle = idle
        self._asked_n += 1
        if lowered:
            self._check_later(self._asked_n, time.monotonic())

    def _check_later(
        self, asked: int, since: float, last: tuple[int, int, float] | None = None, delay: float | None = None
    ) -> None:
        """Have ``_unstarve`` look at spare request number ``asked`` (sent at
        ``since``) ``delay`` seconds from now (default ``_STARVED_AFTER``).
        ``last``: (pid, CPU time, when) as it last saw them."""
        if delay is None:
            delay = _STARVED_AFTER
        ref = weakref.ref(self)  # (a broker dropped unclosed: its zygote's fds go with it, not at the check)

        def check() -> None:
            zygote = ref()
            if zygote is not None:
                zygote._unstarve(asked, since, last, delay)

        with self._check_lock:
            if self._check is not None and self._check[0] > asked:
                return  # a later request's check is set (by a spawn, while this one found the lock taken)
            old, self._check = self._check, None
            now, end = time.monotonic(), since + _CHECK_FOR
            # The last look lands at the window's end; past it, only the zygote raised there is looked
            # at again (for the spare it then makes), for as long again at most.
            when = min(now + delay, end) if now < end else now + delay if now < end + _CHECK_FOR else None
            if when is not None:
                self._check = (asked, idle_watch.call_at(when, check))
        if old is not None:
            old[1]()  # (a no-op for the check that is running now)

    def drop_check(self) -> None:
        """Cancel the pending starvation check (a closing broker: the idle
        watch's thread should end with its last worker)."""
        with self._check_lock:
            old, self._check = self._check, None
        if old is not None:
            old[1]()

    def _unstarve(self, asked: int, since: float, last: tuple[int, int, float] | None, delay: float) -> None:
        """On the idle watch's thread, while spare request number ``asked``
        is unread: the zygote making the spare, then the spare (both at
        SCHED_IDLE), back to normal priority if it is starved (runnable, and
        it got less than a tenth of a CPU since the last look), and at the
        last look (``_CHECK_FOR``) whatever it is doing. Never waits:
        with the lock taken (a spawn, which raises them itself if it waits
        for them; a status, a close) it looks again later. ``delay``: since
        the last look."""
        if not self._lock.acquire(blocking=False):
            self._check_later(asked, since, last, delay)
            return
        try:
            if asked != self._asked_n or not self._pending or self._proc.returncode is not None:
                return  # read, or another request since; or the zygote is gone
            answer = self._spares.peek()  # (read by the next spawn only: see the class)
            making = answer is None
            # The spare is the zygote's child, which it reaps only when asked (under this lock): its pid is its own.
            pid: Any = self._proc.pid if making else answer.get("pid") if type(answer) is dict else None
            if type(pid) is not int or pid <= 0:
                return  # (an error answer: no spare)
            now = time.monotonic()
            late = now >= since + _CHECK_FOR  # the last look: raised, whatever it does (see _CHECK_FOR)
            state = None if late else cpu_state(pid)
            if state is not None:
                runnable, ran = state
                if not runnable:
                    # Blocked: a spare waiting for its request, or reading a module, or a setup()
                    # made ahead that sleeps before it computes: not starved now; again, later.
                    self._check_later(asked, since, None, min(delay * 2, _BLOCKED_MAX))
                    return
                if last is None or last[0] != pid or ran - last[1] > _FAIR_SHARE * (now - last[2]) * 1e9:
                    self._check_later(asked, since, (pid, ran, now))  # it runs: look again
                    return
            # Starved (or /proc does not say, or the last look).
            if making:
                self._hurry()
                # (a spare forked just before is at SCHED_IDLE still; past the window, a zygote that has
                # not answered yet is blocked or hung: looked at less and less often)
                self._check_later(asked, since, None, min(delay * 2, _BLOCKED_MAX) if late else None)
                return
            # Still the zygote's child, so its pid is its own: the zygote reaps a spare only when asked
            # (under this lock). A zygote killed meanwhile has left it to init, which may have reaped
            # it, and its pid may be another process's by now (red-team round 49).
            if parent_of(pid) != self._proc.pid:
                return
            try:
                process_to_foreground(pid)  # (made ahead, it may have started threads: its setup())
            except OSError:
                pass  # gone: the spawn that takes it finds out
        finally:
            self._lock.release()

    def _collect(self, timeout: float) -> None:
        """Read the answer to a pending spare request, if any."""
        if not self._pending:
            return
        self._pending = False
        self.drop_check()
        cgroup, self._asked_cgroup = self._asked_cgroup, None
        try:
            if not self._spares.wait_readable(0):  # usually: the spare was made between spawns
                self._hurry()  # still being made, maybe at SCHED_IDLE
            try:
                reply = _answer(self._spares, timeout, self._died, (self._spare_n, self._stale))
            except OSError as exc:  # (ECONNRESET: it died with the request unread)
                self._kill_now()
                raise _zygote_gone() from exc
            if reply is _UNANSWERED:
                if self._end_unanswered():
                    raise _zygote_gone()
                why = f"zygote did not answer within {timeout:g} s"
                raise WorkerCrashed(why, WorkerExit("crashed", why))
            if reply is None:
                self._kill_now()
                raise _zygote_gone()
            if type(reply) is dict and reply.get("t") == "spare" and isinstance(reply.get("pid"), int) \
                    and isinstance(reply.get("chan"), ReceivedFd):
                try:
                    ahead = self._asked if reply.get("ahead") is True else None
                    if self._asked_idle:
                        self._zygote_idles = reply.get("idle") is True
                    chan = Channel(socket.socket(fileno=reply["chan"].detach()), send_timeout=5.0)
                    self._spare, cgroup = _Spare(reply["pid"], chan, ahead, cgroup, self._asked), None
                except BaseException:
                    if self._spare is None or self._spare.pid != reply["pid"]:
                        self._stale(reply)  # (a Ctrl-C: the spare ended, not left waiting for no one)
                    raise
            elif not (type(reply) is dict and reply.get("t") == "error"):
                raise ProtocolError("zygote sent a malformed reply")
            # an "error" answer (fork failed) just leaves us without a spare
        finally:
            if cgroup is not None:  # no spare came to use it
                cgroup.discard()

    async def spare_made(self, timeout: float) -> None:
        """Wait on the event loop while the zygote makes the spare that the
        next spawn takes, so that spawn() finds it made. The lock is not held:
        spawn() reads the answer, and bounds the wait if it did not come."""
        deadline = time.monotonic() + timeout
        hurried = False
        while self._pending:
            fd = self._spares.fileno()
            if fd < 0 or self._spares.wait_readable(0) or self._died():
                return
            if not hurried:
                self._hurry()  # (the spare may be made at SCHED_IDLE)
                hurried = True
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # Short waits: another thread may take the answer meanwhile.
            await readable(fd, min(left, 0.05))

    def forked_copy(self) -> None:
        """In a forked child: close this copy's ends of the channels to the
        parent's zygote and spare, and tell them nothing."""
        self._lock = threading.Lock()
        self._chan.close()
        self._spares.close()
        if self._lifeline is not None:
            self._lifeline.close()  # (else the parent's workers would outlive it while this copy lives)
        if self._spare is not None:
            self._spare.chan.close()
            self._spare = None
        self._pending = False
        self._asked_cgroup = None  # the parent's
        self._check = None  # (the copy's watch has no timer: see IdleWatch.after_fork_in_child)
        self._check_lock = threading.Lock()

    def ready_now(self) -> bool:
        """Would a spawn now find its spare made (or none coming: it forks
        one on request) and no other request of the zygote's in flight (a
        status being asked for)? A hint: read without the lock, for a spawn
        made from an event loop, which must not wait. (With none coming it
        said no, and the first aspawn() of a main script's class, whose
        import let the spare go, waited spawn_timeout; red-team round 23.)"""
        if self._lock.locked():
            return False
        if self._spare is not None or not self._pending:
            return True
        # (dead, with its channels held by a spare it had just forked: none is coming either, and
        # an aspawn() waited its spawn_timeout for one)
        return self._spares.wait_readable(0) or self._died()

    def forks_next(self) -> bool:
        """Would the next spawn be forked on request, no spare made or
        coming? A hint, read without the lock."""
        return self._spare is None and not self._pending

    def waiting_spare(self) -> tuple[int, int] | None:
        """(pid, fd) of the spare waiting now, after reading a pending answer.
        Exactly one process and one fd of the broker's belong to it."""
        with self._lock:
            self._collect(10.0)
            return None if self._spare is None else (self._spare.pid, self._spare.chan.fileno())

    def alive(self) -> bool:
        if not self.gone():
            return True
        # A killed zygote closes its sockets before it can be waited for: for a moment poll()
        # said "running" after a spawn had seen it gone, and the next spawn used the dead one.
        self._kill_now()  # (reaped, so that this says so at once; nothing to do if it was)
        return False

    def gone(self) -> bool:
        """Has the zygote died, or begun to? Its workers then die with it (the
        parent-death signal), whatever the broker asks them meanwhile. Unlike
        ``alive()``, waits for nothing and kills nothing."""
        if self._died():
            return True
        fd = self._chan.sock.fileno()
        if fd < 0:  # closed: close() or a forked copy let it go
            return True
        hup = select.poll()  # (one per ask: a poll object refuses two threads at once, as pool slots ask)
        # A dying process closes its sockets before it can be waited for; but a spare it has just
        # forked holds a copy of this one until it runs to close it, at background priority.
        hup.register(fd, select.POLLHUP)
        return bool(hup.poll(0))

    def _end_unanswered(self) -> bool:
        """After a wait for its answer that ran out or found it dead: end the
        zygote (its late answer would be taken for the next request's, so the
        next spawn starts a new one) and say whether it had died by itself.
        Asked before the kill, which a look after it would read as its own
        death ("exited" for one stopped or stuck)."""
        died = self._died()
        self._kill_now()
        return died

    def _kill_now(self) -> None:
        """Kill the zygote and wait for it, so that ``alive()`` says so at once."""
        self._hurry()  # (lowered to make a spare, on busy CPUs it took seconds to die: the wait below ran out)
        self._proc.kill()
        try:
            self._proc.wait(2.0)
        except subprocess.TimeoutExpired:
            pass

    def exit_reason(self) -> str:
        code = self._proc.poll()
        return "running" if code is None else returncode_text(code)

    def load(self, cls: type[Worker], timeout: float) -> None:
        """Have the zygote import ``cls`` now and say whether it could: asked
        before a class from the main script is first spawned here, since
        importing a script runs its top-level code. A zygote that does not
        answer within ``timeout`` is killed (it is stuck in that code)."""
        with self._lock:
            try:
                n = self._number()
                self._chan.send({"t": "load", "module": _ref(cls), "qualname": cls.__qualname__, "n": n})
                self._hurry()
                reply = _answer(self._chan, timeout, self._died, (n, self._stale))
                if reply is _UNANSWERED:
                    if self._end_unanswered():  # (killed from outside: see below)
                        why = f"the zygote has exited while importing {cls.__qualname__}"
                        raise WorkerCrashed(why, WorkerExit("crashed", why))
                    # (stuck in the script's top-level code)
                    raise CannotImport(f"the zygote did not import {cls.__qualname__} within {timeout:g} s")
            except OSError as exc:  # (ECONNRESET, EPIPE: it died)
                self._kill_now()  # (see below)
                why = f"the zygote has exited while importing {cls.__qualname__}"
                raise WorkerCrashed(why, WorkerExit("crashed", why)) from exc
        if reply is None:
            # Killed from outside (the OOM killer, an admin), not the script's fault: the next spawn
            # starts a new zygote, which imports the script again. Reaped first: a killed process
            # closes its sockets before it can be waited for, and alive() (poll) said "running"
            # for a moment, so the next spawn used the dead zygote.
            self._kill_now()
            why = f"the zygote has exited while importing {cls.__qualname__}"
            raise WorkerCrashed(why, WorkerExit("crashed", why))
        if type(reply) is dict and reply.get("t") == "loaded":
            with self._lock:
                # A spare forked before the import would import the script again (its
                # top-level code too): let it go; the next spawn forks from the zygote.
                self._collect(timeout)
                if self._spare is not None and self._spare.ahead is None:
                    spare, self._spare = self._spare, None
                    self._discard(spare)
            return
        if type(reply) is dict and reply.get("t") == "error" and isinstance(reply.get("e"), dict):
            cause = exception_from_wire(reply["e"])
            raise CannotImport(f"the zygote cannot import {cls.__qualname__}: {cause}") from cause
        raise ProtocolError("zygote sent a malformed reply")

    def reap(self, pid: int) -> int | None:
        """The exit status of a worker that has ended (call after its pidfd
        fired); None if unknown (the zygote is gone: its children died with it
        and were reaped by init)."""
        with self._lock:
            return self._reap_locked(pid, self._reap_within)

    def closing(self) -> None:
        """The broker is closing: from now on a reap waits at most 2 s for the
        zygote's answer, then ends it. A stopped or stuck zygote held close(),
        even a Ctrl-C'd close(0), 10 s."""
        self._reap_within = 2.0

    def _reap_locked(self, pid: int, timeout: float, let_go: bool = False) -> int | None:
        """``let_go``: a spare's, whose status no one asks for again (an
        answer left unread is passed over, not kept)."""
        if self._died():
            return None  # its children died with it, and were reaped by init
        if let_go:
            self._let_go.add(pid)
        try:
            n = self._number()
            self._chan.send({"t": "reap", "pid": pid, "n": n})
            self._hurry()
            reply = _answer(self._chan, timeout, self._died, (n, self._stale))
            if reply is _UNANSWERED:
                self._kill_now()  # not answering: the next spawn starts anew
                return None
        except (OSError, ProtocolError):
            reply = None
        if reply is None:
            # Gone (killed from outside; its workers died with it, which is why we ask): reaped
            # now, not left a zombie of the broker until the next spawn or close().
            self._kill_now()
            return None
        self._let_go.discard(pid)
        kept = self._statuses.pop(pid, None)  # (reaped by a request whose answer was left unread)
        if type(reply) is dict and reply.get("t") == "status" and reply.get("pid") == pid:
            status = reply.get("status")
            if isinstance(status, int):
                return status
        return kept

    def _number(self) -> int:
        """A new request's number (see ``_answer``). Caller holds the lock."""
        self._n += 1
        return self._n

    def _stale(self, reply: dict[Any, Any]) -> None:
        """An answer to a request whose call was interrupted before it read
        it: a worker made for it (a spawn on request; a spare) is ended, and
        the zygote asked to reap it, whose answer the next request passes
        over in turn; a worker's exit status is kept for the reap asked again
        (the zygote has reaped it). Caller holds the lock."""
        fd = reply.get("chan")
        if isinstance(fd, ReceivedFd):
            fd.close()
        pid, status = reply.get("pid"), reply.get("status")
        if reply.get("t") == "status" and type(pid) is int:
            if pid in self._let_go:
                self._let_go.discard(pid)  # (reaped; nothing asks for it)
            elif type(status) is int and len(self._statuses) < 64:
                self._statuses[pid] = status
        if reply.get("t") in ("spawned", "spare") and type(pid) is int:
            _kill_child_of(self._proc, pid, foreground=self._idle)
            try:
                self._chan.send({"t": "reap", "pid": pid, "n": self._number()})
                self._let_go.add(pid)
            except OSError:
                pass  # gone: its children went with it

    def _died(self) -> bool:
        """Has the process exited? (Reaped now if so: by then its children
        have been sent their parent-death signal.)"""
        return self._proc.poll() is not None

    def close(self) -> None:
        """End the spare (killed and reaped by the zygote, so nothing of it
        outlives this call), then the zygote."""
        self.closing()
        with self._lock:
            try:
                self._collect(2.0)
            except (WorkerCrashed, ProtocolError, OSError):
                pass  # the zygote is gone: its spare died with it
            if self._spare is not None:
                self._discard(self._spare)
                self._spare = None
        self._chan.close()
        self._spares.close()
        if self._lifeline is not None:
            self._lifeline.close()  # what the zygote forked and is still running dies now, not with it
        try:
            self._proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()


def exec_worker(
    cls: type[Worker], spec_wire: Any, timeout: float, grants: list[tuple[str, Any]],
    environ: dict[str, str] | None = None, lifeline: int | None = None,
) -> tuple[int, socket.socket, subprocess.Popen[bytes]]:
    """Start a fresh interpreter that becomes the worker. It is our child.
    ``lifeline``: a read end of the broker's lifeline, for it to arm from."""
    proc, chan, _, _ = _start(["--exec"], environ=environ, lifeline=lifeline)
    try:
        pid, sock = _request_spawn(chan, cls, spec_wire, timeout, grants)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        chan.close()
    return pid, sock, proc
