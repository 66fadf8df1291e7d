"""The broker's handle on one worker, and the synchronous call driver.

A call runs on the caller's thread: it sends the call, then serves the
worker's requests (each checked against the policy) until the result comes
back, the worker dies, breaks the protocol, or the timeout passes. No thread
per worker, no thread per call. Calls on one worker are serialized.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno as _errno
import functools
import itertools
import logging
import math
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from protocol import MessageTooLarge, NotCapable, PrivsepError, ProtocolError, Rights, WorkerCrashed
from protocol._messages import check_message
from protocol._paths import local_path, split_relative
from protocol._remote import exception_from_wire, exception_to_wire
from protocol._wire import KIND_FILE, SCALAR_TYPES, Channel, Deferred, DirRef, ReceivedFd, fd_marker, plain
from worker._output import MAX_LINE
from worker._output import STREAMS as _STREAMS

from ._capability import Capability
from ._cgroup import WorkerCgroup
from ._deliver import Outgoing
from ._exit import WorkerExit
from ._idle_watch import idle_watch
from ._logtext import printable
from ._loop import PerLoopLock, notified_now, readable, ready_now
from ._options import call_timeout, wait_timeout
from ._outputs import KEPT_GRACE, PendingOutput, all_closed, commit_all, drain_failed, kept
from ._signals import raised_by_a_signal_handler
from ._violation import report

if TYPE_CHECKING:
    from ._broker import Broker

log = logging.getLogger("privsep.broker")
output_log = logging.getLogger("privsep.worker")  # what workers print, where the broker asks for it
_IN_CALL = frozenset({"ret", "err", "req", "fail", "out"})
_RET_KEYS = frozenset({"t", "id", "v"})
_ids = itertools.count(1)


def close_fds_in(obj: Any) -> None:
    """Close every received fd inside a decoded message."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, ReceivedFd):
            item.close()
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.values())


def close_each(fds: Iterable[int]) -> None:
    """Close every fd in ``fds``; an exception in one close (a Ctrl-C raised
    once it returned) is raised after the others are closed too."""
    raised: BaseException | None = None
    for fd in fds:
        try:
            os.close(fd)
        except BaseException as exc:
            raised = raised or exc
    if raised is not None:
        raise raised


def import_value(obj: Any) -> Any:
    """Turn fds in a worker's answer into capabilities (rights from the fd)."""
    t = type(obj)
    if t is ReceivedFd:
        fd = obj.detach()
        try:
            return Capability.from_untrusted_fd(fd, name="from worker")
        except BaseException:
            os.close(fd)
            raise
    if (t is list or t is dict) and not plain(obj.values() if t is dict else obj):
        return [import_value(x) for x in obj] if t is list else {k: import_value(v) for k, v in obj.items()}
    return obj


#: Directory entries a listing may read for the broker's time one request costs
#: (about 0.9 us an entry against 25-30 us a request, measured here).
ENTRIES_PER_REQUEST = 32
#: Characters of a request's path that cost the broker about one request more to
#: check (a 4 KiB path of 2,044 parts: 344 us against 47 for a short one).
PATH_CHARS_PER_REQUEST = 512


def _request_cost(msg: dict[str, Any]) -> float:
    """What a request counts against the request rate: one, and one more per
    PATH_CHARS_PER_REQUEST characters of its path."""
    args = msg.get("a")
    path = args.get("path") if type(args) is dict else None
    return 1.0 + (len(path) // PATH_CHARS_PER_REQUEST if type(path) is str else 0)
# How long a worker whose channel hit EOF gets to end before it is killed (an awaited
# call's driver waits for it on the loop).
_EXIT_GRACE = 1.0
# Only an answer may carry data too big for one packet: an error (its fields bounded by
# exception_to_wire) or a handshake never needs to, and a crafted one (64 MiB of text in an
# error's message) was read and decoded, holding the GIL 140 ms, at every call (red-team round 27).
_BLOB_TAGS = frozenset({"ret"})
_KILLED = signal.SIGKILL  # the wait status of a process killed by SIGKILL
# Asked of a worker at stop, without waiting for room: one that keeps its queue full of
# answers it never reads held stop() 10 s past its grace, and astop() the loop with it.
STOP_MESSAGE = {"t": "stop"}


#: What a send raises before anything is sent (an argument that cannot be
#: packed, a message too large): the call is not on its way.
_RAISED_BEFORE_SENDING = (TypeError, ValueError, ArithmeticError, RecursionError, MemoryError, PrivsepError)


class WorkerHandle:
    """Call a worker's ``@rpc`` methods as if they were local.

    ``handle.method(*args, **kwargs)`` runs the call with the handle's
    default timeout; ``handle.with_timeout(s).method(...)`` sets one for a
    single call. A dead worker makes every call raise ``WorkerCrashed`` (or
    ``PolicyViolation`` / ``WorkerTimeout``); ``handle.exit`` says how it ended.
    """

    def __init__(
        self,
        broker: Broker,
        cls: type,
        pid: int,
        chan: Channel,
        *,
        timeout: float | None,
        violation: str = "kill",
        reaper: Callable[[int], int | None] | None = None,
        parent_gone: Callable[[], bool] | None = None,
    ):
        self.id = next(_ids)
        self._broker = broker
        self.cls = cls
        self.pid = pid
        # Held to signal the pidfd and to take it away (to close it, or to hand it to the reaper):
        # else a kill on one thread could read the number, a stop on another close it, and the
        # SIGKILL go to whatever process the number, reused meanwhile, then named.
        self._pidfd_lock = threading.Lock()
        self._pidfd = os.pidfd_open(pid)
        self._cgroup: WorkerCgroup | None = None  # set by the broker right after
        self._cgroup_report: dict[str, Any] | None = None
        self._spawn_grants: tuple[tuple[str, str, Rights], ...] = ()  # (name, path, rights): audited when ready
        self._reaper = reaper or _waitpid
        # Has the process that forked it (a zygote) died? Then so does it, unasked.
        self._parent_gone = parent_gone
        # The reaper is asked once: a second ask could name a process given the pid since
        # (the zygote would wait for it). Its answer is kept here.
        self._reap_lock = threading.Lock()
        self._status: Any = _NOTHING
        self._undelivered = False  # the call's send found the channel's end
        self._stop_sent = False  # the broker has sent the stop message (stop(), astop(), close())
        self._sigkilled = False  # the broker has sent SIGKILL
        self._may_fork = False  # it may have processes of its own, in its process group
        self._foreign = False  # a forked child's copy of the parent's handle (_forked_copy)
        self._chan = chan
        # Out-of-band values (memfd blobs) only in what ends a call or a start: a request or
        # a printed line never needs one, and each would cost the broker a read of up to 64 MiB
        # before its refusal, at the request rate.
        chan.blob_tags = _BLOB_TAGS
        self._notify_fd = -1
        self._watched = False  # the listener is on the idle watch (see _idle_watch)
        self._exit_watched = False  # and the pidfd
        # Told, on the idle watch's thread, of an end the watch recorded (a pool counts it).
        self._on_idle_end: Callable[[WorkerHandle], None] | None = None
        self._idle_due: float | None = None  # when an EPERM held to the request rate is due, between calls
        self._idle_last = 0.0  # when the last one between calls was answered
        self._chan_turn = False  # errno mode, both ready: the channel's turn was last (see _first)
        self._cpu_limited = False  # set by the broker: its RLIMIT_CPU is set (SIGXCPU can be the limit's)
        self._stderr_fd = -1  # the read end of its stderr pipe (worker_output), read when it ends
        self._lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self.timeout = timeout
        self.violation = violation
        self.sandbox: dict[str, Any] = {}
        self.spawn_method = "fork"
        self.exit: WorkerExit | None = None
        self.calls = 0
        # Orders the awaited calls of one event loop. Another loop (a second asyncio.run(), a
        # test's own loop) gets a lock of its own; self._lock still excludes the rest.
        self._alock = PerLoopLock()
        self._pending_call: int | None = None  # sent, its answer not yet taken
        self._call_thread: int | None = None  # the thread whose call (or awaited stop) holds _lock
        # Set by kill()/stop() before the SIGKILL that ends a call in flight on another
        # thread, which records the end: so that it reads as what it was, not as any SIGKILL.
        self._ending: WorkerExit | None = None
        self._awaited = False  # a call of it is awaited on an event loop now
        # An awaited call's wait on the loop: (loop, future, fds watched).
        self._waiting: tuple[asyncio.AbstractEventLoop, asyncio.Future[str], list[int]] | None = None
        self._dirs: dict[int, Capability] = {}
        self._call_dirs: list[int] = []  # directories passed as arguments of the call in flight
        self._listings: dict[tuple[int, str], list[str]] = {}  # listings being paged, until the call ends
        # Broker fds held for this worker's requests (see _budget): all of them, the
        # directories it asked for among them, and the outputs of the call in flight.
        self._held = 0
        self._held_dirs: set[int] = set()
        self._held_call = 0
        self._to_commit: list[PendingOutput] = []  # a call's outputs, while its driver commits them
        self._outputs_allowed: frozenset[str] | None = None  # the call's outputs, named ahead (with_outputs)
        self._call_what: tuple[str, float | None] = ("", None)  # the timed call in flight: (method, timeout)
        self._dir_ids = itertools.count(1)
        self._drains: dict[int, Any] = {}  # output pipes of the current call, by read fd
        self._poller: select.poll | None = None
        self._fast_events = 0
        self._resumed = 0.0  # when the awaited call's task last came back from the loop
        self._to_answer: tuple[dict[str, Any], list[PendingOutput], bool] | None = None
        self._to_finish: Deferred | None = None  # a message whose blobs its driver reads
        # Held while a request is answered on one of the broker's threads: the worker's fds (its channel, its
        # directories) close only after, never under that thread (re-entrant: it may end the worker).
        self._answering = threading.RLock()
        self._exit_lock = threading.Lock()  # (see _set_exit)
        self._tokens = float(broker.request_rate or 0.0)
        self._tokens_at = time.monotonic()

    def __repr__(self) -> str:
        state = "alive" if self.exit is None else self.exit.kind
        return f"<WorkerHandle #{self.id} {self.cls.__name__} pid={self.pid} {state}>"

    @property
    def name(self) -> str:
        return f"#{self.id} {self.cls.__name__} (pid {self.pid})"

    @property
    def alive(self) -> bool:
        """Is the worker's process running? (One that ended while no call or
        stop was made has its ``exit`` recorded by the idle watch within
        moments; this sees the end at once.)"""
        return self.exit is None and not self._pidfd_ready()

    def _pidfd_ready(self) -> bool | None:
        """Has the process ended, by its pidfd? None once the pidfd is gone
        (reaped). Under the pidfd's lock, for a caller that does not hold the
        call lock: a stop on another thread may close the pidfd meanwhile (an
        akill() racing a stop() dup'ed it closed: EBADF; its number reused, it
        would have looked at another file)."""
        with self._pidfd_lock:
            return None if self._pidfd < 0 else ready_now(self._pidfd)

    # -- calling ----------------------------------------------------------
    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or name not in getattr(self.cls, "rpc_methods", ()):
            raise AttributeError(f"{self.cls.__name__} has no @rpc method {name!r}")
        caller = functools.partial(self._call_known, name)
        if self.exit is None:
            self.__dict__[name] = caller  # found directly from now on (until the end: see _set_exit)
        return caller

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        self._check_method(method)
        try:
            return self._call(method, args, kwargs, self.timeout)
        except BaseException:
            del args, kwargs  # see _call_known
            raise

    def _call_known(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._call(method, args, kwargs, self.timeout)  # (a name __getattr__ checked)
        except BaseException:
            # The traceback keeps this frame: a caller keeping the exception
            # must not keep the call's arguments (a capability's fd) with it.
            del args, kwargs
            raise

    def with_timeout(self, seconds: float | None) -> _Timed:
        """A view of this handle whose calls time out after ``seconds``
        (positive; None or infinity: no limit)."""
        return _Timed(self, call_timeout(seconds, "timeout"))

    def with_outputs(self, *paths: str | os.PathLike[str]) -> _Timed:
        """A view of this handle whose calls may create these outputs and no
        others (each once), whatever else the policy would let the worker
        create: ``handle.with_outputs("out/a.txt").extract(...)``. With no
        path, a call may create none."""
        return _Timed(self, self.timeout, output_paths(paths))

    def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        outputs: frozenset[str] | None = None,
    ) -> Any:
        """Run a call. ``method`` is one of the class's @rpc methods: the caller checked.
        ``outputs``: the only outputs it may create (None: any the policy allows)."""
        if self._call_thread == threading.get_ident():
            # Awaited on this thread's event loop (or a signal handler's call within a call):
            # the lock's holder cannot go on while this thread waits for it.
            raise RuntimeError(
                f"worker {self.name} has a call of this thread in flight (awaited on its event loop): a "
                f"synchronous call here would wait for it for ever; await handle.aio.{method}(...) instead"
            )
        with self._lock:
            self._call_thread = threading.get_ident()
            self._outputs_allowed = outputs
            try:
                cid, deadline = self._begin(method, args, kwargs, timeout)
                value, first = self._early_answer(cid)
                if value is not _NOTHING:
                    return value
                steps = self._steps(method, cid, deadline, timeout, first)
                try:
                    op = next(steps)
                    while True:
                        kind, when = op
                        if kind == "sleep" and when is not None:
                            time.sleep(max(0.0, when - time.monotonic()))
                            op = steps.send(None)
                        elif kind == "exit" and when is not None:
                            self._wait_exit(when - time.monotonic())
                            op = steps.send(None)
                        elif kind == "commit":
                            op = steps.send(_commit(self._to_commit))
                        elif kind == "answer":
                            op = steps.send(self._answer_waiting())
                        elif kind == "finish":
                            op = steps.send(_finished(self._to_finish))
                        else:
                            # Poll, then receive. (Only the first answer is tried without a
                            # poll, in _early_answer; after a miss, or after answering a
                            # request, a receive that finds nothing costs more than the poll.)
                            op = steps.send(self._wait(when))
                except StopIteration as stop:
                    return stop.value
                finally:
                    steps.close()
            except BaseException as exc:
                del args, kwargs  # (kept by the traceback otherwise: see _call_known)
                if self._pending_call is not None:
                    self._abandon(method, exc)
                raise
            finally:
                self._call_ended()

    # -- asyncio ----------------------------------------------------------
    @property
    def aio(self) -> _Async:
        """The async face: ``await handle.aio.method(...)``.

        Runs on the event loop with no thread per call: the loop watches the
        worker's channel and serves its requests as they come.
        """
        return _Async(self, self.timeout)

    async def _acall(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        outputs: frozenset[str] | None = None,
    ) -> Any:
        self._check_method(method)
        async with self._loop_lock():
            if not self._lock.acquire(blocking=False):
                await self._lock_from_loop()  # a call of another thread, or of another event loop
            self._call_thread = threading.get_ident()
            self._outputs_allowed = outputs
            self._awaited = True
            self._resumed = time.monotonic()
            # On the event loop a send must never wait: a worker that does not
            # read its answers is misbehaving, and is ended rather than waited for.
            saved, self._chan.send_timeout = self._chan.send_timeout, 0.0
            try:
                if self._heavy(args, kwargs):
                    cid, deadline = await self._off_loop(functools.partial(self._begin, method, args, kwargs, timeout))
                else:
                    cid, deadline = self._begin(method, args, kwargs, timeout)
                value, first = self._early_answer(cid)  # once per call: the loop is never held for long
                if value is not _NOTHING:
                    self._fast_events += 1
                    if self._fast_events % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a caller looping on instant answers still lets others run
                    return value
                steps = self._steps(method, cid, deadline, timeout, first)
                try:
                    op = next(steps)
                    while True:
                        kind, when = op
                        # (after each await the loop has run others: the driver's turn starts anew)
                        if kind == "sleep" and when is not None:
                            await asyncio.sleep(max(0.0, when - time.monotonic()))
                            self._resumed = time.monotonic()
                            op = steps.send(None)
                        elif kind == "exit" and when is not None:
                            await self._aended(max(0.0, when - time.monotonic()))
                            self._resumed = time.monotonic()
                            op = steps.send(None)
                        elif kind == "commit":
                            committed = await self._commit_off_loop(self._to_commit)
                            self._resumed = time.monotonic()
                            op = steps.send(committed)
                        elif kind == "answer":
                            answered = await self._off_loop(self._answer_waiting)
                            self._resumed = time.monotonic()
                            op = steps.send(answered)
                        elif kind == "finish":
                            deferred = self._to_finish
                            try:
                                finished = await _off_loop(functools.partial(_finished, deferred),
                                                           self._broker._background.executor(), undo=close_fds_in)
                            except BaseException:
                                if deferred is not None:
                                    deferred.discard()  # (a no-op unless the thread never took it)
                                raise
                            self._resumed = time.monotonic()
                            op = steps.send(finished)
                        else:
                            op = steps.send(await self._event(when))
                except StopIteration as stop:
                    return stop.value
                finally:
                    steps.close()
            except BaseException as exc:
                del args, kwargs  # (kept by the traceback otherwise: see _call_known)
                if self._pending_call is not None:
                    self._abandon(method, exc)  # cancelled, typically
                raise
            finally:
                self._chan.send_timeout = saved
                self._awaited = False
                self._call_ended()
                self._lock.release()

    async def _off_loop(self, work: Callable[[], _T]) -> _T:
        """``work()`` on the broker's threads; a cancel meanwhile waits for it."""
        return await _off_loop(work, self._broker._background.executor())

    async def _commit_off_loop(self, outputs: list[PendingOutput]) -> Exception | None:
        """``_commit`` for an awaited call: an output that must be copied (up to
        Limits.file_size of data) is copied on a thread, so the loop runs on. A
        cancel meanwhile waits for the commit, which is all or none, to end."""
        if all(out.drain is not None and out.linkable for out in outputs):
            return _commit(outputs)  # links only: at once
        return await self._off_loop(functools.partial(_commit, outputs))

    def _heavy(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Would sending these arguments hold the loop? Big buffers (packed
        and copied into the wire's memfd: 60 MiB took 140 ms), at the top or
        nested, or a file that starts the restricted opener (90 ms). The
        walk is bounded: past ``_WALK`` items the arguments count as heavy,
        since the walk would cost what packing does; so does a subclass of a
        buffer or a container (its ``__len__`` or ``__iter__`` is the
        program's code, which the packer never runs: not run on the loop)."""
        pending: list[Any] = [*args, *kwargs.values()] if kwargs else list(args)
        size, items = 0, len(pending)
        while pending:
            x = pending.pop()
            t = type(x)
            if t is int or t is float or t is bool or x is None:
                continue
            if t is bytes or t is str or t is bytearray:
                size += len(x)
            elif t is memoryview:
                size += x.nbytes
            elif t is list or t is tuple or t is dict:
                items += len(x)
                if items > _WALK:
                    return True
                if t is dict:
                    pending.extend(x.keys())
                    pending.extend(x.values())
                else:
                    pending.extend(x)
            elif t is Capability:
                if x.kind == KIND_FILE and self._broker._starts_opener(int(x.rights)):
                    return True
            elif isinstance(x, _BUFFERS_AND_CONTAINERS):
                return True
            if size > _HEAVY_ARG:
                return True
        return False

    async def _lock_from_loop(self) -> None:
        """Take the call lock, which a call of another thread or event loop
        holds, without blocking this loop: polled, a few ms apart at most
        (no helper thread, whose acquire a cancellation could not undo)."""
        pause = 0.0005
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.005)

    async def _event(self, deadline: float | None) -> str:
        """The next event for an awaited call: "chan", "notify", "timeout", or
        "gone" (the worker was ended on this thread while the call waited)."""
        while True:
            if self.exit is not None:  # ended by another task while this one was not waiting on its fds
                return "gone"
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"  # even if the worker keeps a message always waiting
            ready = self._ready_now()
            if ready is not None:
                # Fast path, but a worker that keeps the channel full must not
                # monopolise the loop: one message a turn, the others' turns
                # between (three workers pipelining requests held the loop for
                # eight each: other calls waited 2.0 ms at the median, 0.65 ms
                # now; red-team round 26), and a pause after costly requests
                # (a listing of 100,000 names takes a fifth of a second).
                held = time.monotonic() - self._resumed
                if held > _TURN:
                    # sleep(0) would let the others take one step, not run: a pause as
                    # long as the loop was held (at most 50 ms) lets timers and fds be served.
                    await asyncio.sleep(min(held, 0.05))
                else:
                    await asyncio.sleep(0)
                self._resumed = time.monotonic()
                return ready
            woke = await self._readable(deadline)
            self._resumed = time.monotonic()
            if woke != "notify":
                return woke
            # The listener woke the loop: a notification, or its hang-up once the
            # worker has exited. _ready_now() tells them apart.

    async def _readable(self, deadline: float | None) -> str:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()

        def on_ready(what: str) -> None:
            if not fut.done():
                fut.set_result(what)

        fds = [self._chan.fileno()]
        loop.add_reader(fds[0], on_ready, "chan")
        if self._notify_fd >= 0:
            fds.append(self._notify_fd)
            loop.add_reader(self._notify_fd, on_ready, "notify")
        for fd in list(self._drains):
            fds.append(fd)
            loop.add_reader(fd, self._step_drain, fd, loop)
        self._waiting = (loop, fut, fds)
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # (not wait_for: on Python 3.11 it drops a cancel that lands as the future is done, gh-86296)
            async with asyncio.timeout(remaining):
                return await fut
        except TimeoutError:
            return "timeout"
        finally:
            if self._waiting is not None and self._waiting[1] is fut:  # (else _stop_waiting let go already)
                self._waiting = None
                for fd in fds:
                    loop.remove_reader(fd)

    def _stop_waiting(self) -> None:
        """Wake an awaited call's wait with "gone", after taking its fds off
        the loop: they are about to be closed. Runs on the loop's thread."""
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            loop, fut, fds = waiting
            if loop.is_closed():  # (closed with the call's task kept: nobody waits, nothing is watched)
                return
            for fd in fds:
                loop.remove_reader(fd)
            if not fut.done():
                fut.set_result("gone")

    def _step_drain(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        drain = self._drains.get(fd)
        if drain is not None and not drain.step():
            del self._drains[fd]
            loop.remove_reader(fd)

    def _ready_now(self) -> str | None:
        """The event already pending, if any (no waiting, no event loop)."""
        return self._pick(self._poll_set().poll(0), self._chan.fileno())

    def _pick(self, events: list[tuple[int, int]], chan_fd: int) -> str | None:
        """The event a call takes of those polled on the channel and the
        listener (a listener hung up is dropped)."""
        chan = notify = False
        for fd, ev in events:
            if fd == chan_fd:
                chan = True
            elif ev & select.POLLIN:
                notify = True
            else:
                self._drop_notify()
        return self._first(chan, notify)

    def _first(self, chan: bool, notify: bool) -> str | None:
        """Which of two ready events a call takes first. A violation, before
        the answer that may come with it; but one answered with an errno
        leaves the worker running, and then each waits its turn: a worker
        whose threads always had one waiting held its call, which never read
        its answer (for minutes, or until its timeout; red-team round 41),
        and one that always had a message waiting (printed lines) held its
        violations unanswered and unaudited for the whole call (round 42)."""
        if chan and notify and self.violation == "errno":
            self._chan_turn = not self._chan_turn
            return "chan" if self._chan_turn else "notify"
        if notify:
            return "notify"
        return "chan" if chan else None

    def _poll_set(self) -> select.poll:
        """The channel and the listener, registered once."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self._chan.fileno(), select.POLLIN)
            if self._notify_fd >= 0:
                poller.register(self._notify_fd, select.POLLIN)
        return poller

    def _drop_notify(self) -> None:
        """The listener hung up without a notification: no task of the worker
        is left (its channel ends too). Stop watching it; a hung-up fd would
        wake every poll at once."""
        self._unwatch()
        fd, self._notify_fd = self._notify_fd, -1
        if fd >= 0:
            if self._poller is not None:
                self._poller.unregister(fd)
            os.close(fd)

    def _unwatch(self) -> None:
        """Take the listener off the idle watch (before it is closed)."""
        if self._watched:
            self._watched = False
            idle_watch.unwatch(self._notify_fd)

    def _check_method(self, method: str) -> None:
        if method not in getattr(self.cls, "rpc_methods", ()):
            raise AttributeError(f"{self.cls.__name__} has no @rpc method {method!r}")

    def _begin(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
               ) -> tuple[int, float | None]:
        """Send the call; returns its id and deadline."""
        if self.exit is not None:
            # (a forked copy's worker has not ended: it is the parent's, which it serves on; a user trial)
            raise self.exit.error(self.name, later=not self._foreign)
        cid = next(self._call_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        # A send to this worker (the call, an answer to one of its requests) waits for room no
        # longer than the call may last (_call_ended lets it go).
        self._chan.send_deadline = deadline
        self._call_what = (method, timeout)
        sending = False
        try:
            if args or kwargs:
                after: list[Any] = []
                export = self._broker._export
                try:
                    # A grant that cannot be delivered fails the call, not the worker.
                    call = {
                        "t": "call",
                        "id": cid,
                        "m": method,
                        "a": [export(self, x, after) for x in args],
                        "k": export(self, kwargs, after, 1) if kwargs else {},
                    }
                except BaseException:
                    _release(after)
                    raise
                try:
                    arg = call["a"][0] if len(args) == 1 and not kwargs else None
                    if type(arg) is Outgoing:  # one file, the commonest argument with an fd: no walk for it
                        fd, kind, rights = arg.__privsep_fd__()
                        call["a"] = [fd_marker(0, kind, int(rights))]
                        sending = True
                        self._send(call, "could not deliver the call", one_fd=fd)
                    else:
                        sending = True
                        self._send(call, "could not deliver the call", with_fds=bool(after))
                finally:
                    _release(after)
            else:
                sending = True
                self._send({"t": "call", "id": cid, "m": method, "a": [], "k": {}}, "could not deliver the call")
        except _ChannelGone:
            self._undelivered = True  # the channel's end: the worker's, as at EOF (_early_answer)
        except BaseException as exc:
            args, kwargs, call, arg = (), {}, {}, None  # (kept by the traceback otherwise: see _call_known)
            self._drains.clear()
            if sending and (not isinstance(exc, _RAISED_BEFORE_SENDING) or raised_by_a_signal_handler(exc)):
                # A Ctrl-C (or a signal handler's own exception) during the send: maybe just
                # after it, raised once the syscall had returned, so the call may be on its way.
                # Pending, so that the caller ends the worker as for any call it stopped waiting
                # for: its answer, out of turn, ended it as a protocol breaker at the next call.
                self._pending_call = cid
            raise
        self._pending_call = cid
        if not self._undelivered:  # (one that never reached the worker never ran: a pool sends it again)
            self.calls += 1
        return cid, deadline

    def _early_answer(self, cid: int) -> tuple[Any, _Received | None]:
        """Right after sending call ``cid``: often the answer is already there
        (the worker ran while we sent). Returns (its value, None) for a plain
        answer, taken without a poll or the state machine; else (_NOTHING, the
        message already received if there was one, for the state machine)."""
        if self._undelivered:  # the call's send found the channel's end
            self._undelivered = False
            return _NOTHING, _Received(self._queued(self._awaited))
        if self._drains:
            return _NOTHING, None
        msg = self._receive(nowait=True, defer=self._awaited)
        if msg is _NOTHING:
            return _NOTHING, None
        if msg is not None:
            value = self._plain_return(msg, cid)
            if value is not _NOTHING:
                self._pending_call = None
                return value, None
        return _NOTHING, _Received(msg)

    def _plain_return(self, msg: Any, cid: int) -> Any:
        """The value if ``msg`` is the answer to call ``cid`` (the common case,
        taken without the state machine); _NOTHING for anything else."""
        if type(msg) is not dict or msg.get("t") != "ret":
            return _NOTHING
        if msg.keys() == _RET_KEYS and msg["id"] == cid and type(msg["id"]) is int:  # the whole check for 'ret'
            value = msg["v"]
            if type(value) in SCALAR_TYPES:
                return value
            return self._import_answer(msg)
        self._check_in_call(msg, cid)
        return self._import_answer(msg)

    def _check_in_call(self, msg: Any, cid: int) -> None:
        try:
            check_message(msg, _IN_CALL)
            if msg["t"] == "fail":  # it cannot go on, and says why
                close_fds_in(msg)  # (none belong in it; any sent with it go now, not at collection)
                cause = exception_from_wire(msg["e"])
                raise self._fail("crashed", f"the worker failed: {type(cause).__name__}: {cause}") from cause
            if msg["t"] == "out":
                if not self._broker.worker_output:
                    raise ProtocolError("output the broker did not ask for")
                if msg["s"] not in _STREAMS or len(msg["x"]) > MAX_LINE:
                    raise ProtocolError("output line out of bounds")
            elif msg["id"] != cid and msg["t"] != "req":
                raise ProtocolError("answer to a call that is not pending")
        except ProtocolError as exc:
            close_fds_in(msg)
            raise self._fail("protocol", str(exc)) from exc

    def _log_output(self, stream: str, text: str) -> None:
        level = logging.INFO if stream == "stdout" else logging.WARNING
        if output_log.isEnabledFor(level):  # escaped in the line; record.privsep keeps it as it was
            record = {"worker": self.id, "pid": self.pid, "stream": stream, "text": text}
            output_log.log(level, "worker %s %s: %s", self.name, stream, printable(text), extra={"privsep": record})

    def _import_answer(self, msg: dict[str, Any]) -> Any:
        try:
            return import_value(msg["v"])
        except OSError as exc:
            close_fds_in(msg)
            raise self._fail("protocol", f"unusable fd in the answer: {exc}") from exc

    def _steps(
        self, method: str, cid: int, deadline: float | None, timeout: float | None, first: _Received | None = None
    ) -> Generator[tuple[str, float | None], str | _Received | BaseException | None, Any]:
        """The rest of a sent call as a sans-I/O state machine shared by the
        sync and async drivers. Yields ("wait", deadline) to get the next event
        ("chan", "notify", "timeout", or a message the driver received),
        ("sleep", until) to be throttled, ("commit", None) to have the
        driver commit ``self._to_commit`` (sent back: the error, or None), or
        ("answer", None) to have it call ``_answer_waiting`` (the same).
        ``first``: a message already received."""
        outputs: list[PendingOutput] = []
        try:
            requests = 0
            unsent = 0  # answers that found the channel's end
            while True:
                if first is not None:
                    event: str | _Received | BaseException | None = first
                    first = None
                else:
                    event = yield ("wait", deadline)
                    if self.exit is not None:  # ended on this thread while the call waited ("gone")
                        raise self.exit.error(self.name)
                if type(event) is _Received:
                    msg = event.msg
                elif event == "timeout":
                    raise self._fail("timeout", f"call {method}() ran past its {timeout:g} s timeout")
                elif event == "notify":
                    # A violation answered with an errno is work a worker asks of the broker (and an
                    # audit event): held to the request rate, the worker blocked in its syscall meanwhile.
                    if self.violation == "errno":
                        until = self._throttle(1.0)
                        if until is not None:
                            yield from self._wait_turn(until, method, deadline, timeout)
                    self._on_notification()
                    continue
                else:
                    msg = self._receive(defer=self._awaited)
                if type(msg) is Deferred:
                    # Its blobs (up to 64 MiB) read by the driver: off the loop for an awaited
                    # call (a 60 MiB answer held it 60-110 ms; red-team round 26).
                    self._to_finish = msg
                    msg = yield ("finish", None)
                    self._to_finish = None
                    if isinstance(msg, ProtocolError):
                        raise self._fail("protocol", str(msg)) from msg
                    if isinstance(msg, BaseException):
                        raise msg
                if msg is None:
                    yield from self._ended(deadline)
                self._check_in_call(msg, cid)
                tag = msg["t"]
                if tag == "req":
                    requests += 1
                    until = self._throttle(_request_cost(msg))
                    if until is not None:  # (a generator only when it must wait: every request comes here)
                        yield from self._wait_turn(until, method, deadline, timeout)
                    over_quota = requests > self._broker.max_requests_per_call
                    if self._awaited and (msg.get("op") in _SCANS or self._broker._request_starts_opener(msg)):
                        # A listing may read 100,000 entries (a fifth of a second), and the first
                        # file that needs the restricted opener starts it (about 90 ms): an
                        # awaited call has them answered on a thread, so the loop runs on.
                        self._to_answer = (msg, outputs, over_quota)
                        failed = yield ("answer", None)
                        self._to_answer = None
                    else:
                        failed = self._answer_here(msg, outputs, over_quota)
                    if isinstance(failed, _ChannelGone):
                        # What the worker queued before its end is read (its reason for failing, its
                        # answer): a socket's queue, not a worker that goes on sending with its
                        # read side shut (a flood held the call, and the loop, as long as it lasted).
                        unsent += 1
                        if unsent > _QUEUED_AT_END:
                            yield from self._ended(deadline)
                        first = _Received(self._queued(self._awaited))
                        continue
                    if isinstance(failed, BaseException):
                        raise failed
                elif tag == "out":  # a line the worker printed (asked for: worker_output)
                    until = self._throttle(1.0)
                    if until is not None:
                        yield from self._wait_turn(until, method, deadline, timeout)
                    self._log_output(msg["s"], msg["x"])
                elif tag == "ret":
                    self._pending_call = None
                    value = self._import_answer(msg)
                    yield from self._outputs_closed(outputs, method, deadline)
                    if outputs:
                        # All or none, by the driver: an awaited call's copies of big outputs
                        # are made off the event loop's thread.
                        self._to_commit = outputs
                        failed = yield ("commit", None)
                        self._to_commit = []
                        if isinstance(failed, Exception):
                            # The renames are one per output: a failure between two leaves the earlier
                            # in place (a directory made at a later one's name meanwhile). Said as it is,
                            # in the audit and to the caller, not as though nothing were committed.
                            placed = [out for out in outputs if out.placed]
                            for out in placed:
                                self._broker._audit(self, "commit", out.display, None, "granted",
                                                    "output committed (a later output of its call failed)")
                                outputs.remove(out)
                            failed.committed = [out.display for out in placed]  # type: ignore[attr-defined]
                            if placed:
                                failed.add_note("committed before the failure: "
                                                + ", ".join(repr(d) for d in failed.committed))  # type: ignore[attr-defined]
                            raise failed
                    for out in outputs:
                        self._broker._audit(self, "commit", out.display, None, "granted", "output committed")
                    outputs.clear()
                    return value
                else:
                    self._pending_call = None
                    remote = exception_from_wire(msg["e"])
                    if not isinstance(remote, MemoryError):  # (an oom ends it anyway; pipes are let go)
                        yield from self._outputs_closed([o for o in outputs if o.drain is None], method, deadline)
                    if isinstance(remote, MemoryError):
                        # Its heap is suspect now: stop it and say why.
                        raise self._fail("oom", f"call {method}() ran out of memory") from remote
                    failed_drain = drain_failed(outputs)
                    if failed_drain is not None:  # its write failed (EPIPE) because the broker stopped reading
                        raise failed_drain from remote
                    raise remote
        except BaseException:
            # The exception's traceback holds this frame, which a finished generator keeps with
            # its locals: one naming the exception made a cycle for the collector (a rejected
            # input, the common error, left 15-38 objects a call; gen-2 collections of 20 ms
            # held an event loop serving them; a user trial).
            event = msg = failed = failed_drain = None
            remote = None
            raise
        finally:
            self._drains.clear()
            for out in outputs:  # (those committed were cleared from the list)
                out.discard()
                if out.placed:  # (the commit finished, then an interrupt that came during it was raised)
                    self._broker._audit(self, "commit", out.display, None, "granted",
                                        "output committed (then the call was interrupted)")
                else:
                    self._broker._audit(self, "commit", out.display, None, "failed", "discarded: its call failed")

    def _ended(self, deadline: float | None) -> Generator[tuple[str, float | None], Any, NoReturn]:
        """The channel's end (EOF, or a send found it closed): the worker is
        ending, or closed its channel and runs on. It gets a moment to end,
        never past the call's ``deadline``, which the driver waits for (an
        event loop runs on, and has its exit status asked for off the loop)."""
        until = time.monotonic() + _EXIT_GRACE
        yield ("exit", until if deadline is None else min(until, deadline))
        if self.exit is not None:
            raise self.exit.error(self.name)
        raise self._died(grace=0.0)

    def _answer_here(self, msg: dict[str, Any], outputs: list[PendingOutput], over_quota: bool
                     ) -> _ChannelGone | None:
        """``_answer`` on this thread; the channel's end, if the answer found it."""
        try:
            self._answer(msg, outputs, over_quota=over_quota)
        except _ChannelGone as gone:
            return gone
        return None

    def _outputs_closed(self, outputs: list[PendingOutput], method: str, deadline: float | None
                        ) -> Generator[tuple[str, float | None], Any, None]:
        """Once a call has answered (a value or an error), its outputs should
        be closed: a moment for a close racing the answer (the caller's loop
        runs meanwhile, and never past the call's deadline). A pipe still
        open then fails the commit; a file delivered as itself still open
        ends the worker: an fd cannot be taken back, and the file's blocks are
        freed only when its last fd goes (one worker kept (dup) each output's
        file and filled it after the commit, open_files x file_size of disk
        under no name)."""
        if all_closed(outputs):
            return
        until = time.monotonic() + KEPT_GRACE
        until = until if deadline is None else min(until, deadline)
        pause = 0.001
        while not all_closed(outputs) and time.monotonic() < until:
            yield ("sleep", min(until, time.monotonic() + pause))
            if self.exit is not None:
                raise self.exit.error(self.name)
            pause = min(2 * pause, 0.02)
        held = kept(outputs)
        if held is not None:
            raise self._fail("protocol", f"call {method}() kept the file of its output {held.display!r} open past "
                             "its answer (the disk that file holds is freed only when the worker ends)")

    def _receive(self, nowait: bool = False, defer: bool = False) -> Any:
        """The next message (None at EOF; _NOTHING if ``nowait`` and none is
        waiting; with ``defer``, one carrying blobs as a Deferred, for the
        state machine's driver to finish). A packet that breaks the wire
        rules ends the worker."""
        try:
            return self._chan.recv(nowait, defer)
        except BlockingIOError:
            return _NOTHING
        except ProtocolError as exc:
            raise self._fail("protocol", str(exc)) from exc
        except OSError as exc:
            if exc.errno in _GONE:
                # ECONNRESET: it closed its end with a message of ours unread. The kernel says so
                # before giving what the worker sent before it closed, which is still read.
                return self._queued(defer)
            if raised_by_a_signal_handler(exc):
                raise  # (a TimeoutError of the program's: its call is interrupted)
            raise self._fail("crashed", f"channel error: {exc}") from exc

    def _queued(self, defer: bool = False) -> Any:
        """Once the channel's end was found (a send failed, a receive was
        reset): the next message the worker sent before it, never waited for;
        None when there is none (read as EOF: its reason for failing, a call's
        answer, come first)."""
        for _ in range(2):  # (a reset is said once, before what was queued)
            try:
                return self._chan.recv(True, defer)
            except BlockingIOError:
                return None  # (its end shut for reading only, say: nothing more is waited for)
            except ProtocolError as exc:
                raise self._fail("protocol", str(exc)) from exc
            except OSError as exc:
                if exc.errno != _errno.ECONNRESET:
                    return None
        return None

    def _throttle(self, cost: float = 1.0) -> float | None:
        """Token bucket on worker requests (and violations answered with an
        errno): returns when to answer, if later."""
        rate = self._broker.request_rate
        if rate is None:
            return None
        now = time.monotonic()
        burst = max(1.0, rate)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        self._tokens -= cost
        if self._tokens >= 0:
            return None
        return now + (-self._tokens) / rate

    def _wait_turn(
        self, until: float, method: str, deadline: float | None, timeout: float | None
    ) -> Generator[tuple[str, float | None], Any, None]:
        """The state machine's wait for the worker's turn, ``until`` (``yield from``):
        never past the call's deadline, which ends the call as its timeout does."""
        late = deadline is not None and until >= deadline
        yield ("sleep", deadline if late else until)
        if self.exit is not None:
            raise self.exit.error(self.name)
        if late:
            raise self._fail("timeout", f"call {method}() ran past its {timeout:g} s timeout")

    def _charge_entries(self, entries: int) -> None:
        """A listing read ``entries`` directory entries for this worker: held to
        ``request_rate`` as the requests that cost the broker as much would
        be (a relisting flood cost the broker 200 times the worker's CPU)."""
        if self._broker.request_rate is not None:
            self._tokens -= entries / ENTRIES_PER_REQUEST

    def _answer(self, msg: dict[str, Any], outputs: list[PendingOutput], over_quota: bool = False) -> None:
        reply: dict[str, Any]
        after: list[Any] = []
        one_fd = -1
        try:
            try:
                value = self._broker._serve_request(self, msg["op"], msg["a"], outputs, after, over_quota)
                if type(value) is Outgoing:  # a file: the reply's one fd, sent without a walk for fds
                    one_fd, kind, rights = value.__privsep_fd__()
                    value = fd_marker(0, kind, int(rights))
                reply = {"t": "rep", "id": msg["id"], "v": value}
            except (PrivsepError, OSError) as exc:
                if raised_by_a_signal_handler(exc):
                    raise  # (the program's: its call is interrupted, not the worker's request refused)
                one_fd = -1
                reply = {"t": "rerr", "id": msg["id"], "e": exception_to_wire(exc, with_traceback=False)}
            except Exception as exc:
                if raised_by_a_signal_handler(exc):
                    raise
                # A fault of the broker's own: the request fails and says so; the
                # call and the worker go on (the log has the traceback).
                log.exception("worker %s: serving its %s request failed", self.name, printable(str(msg["op"])))
                one_fd = -1
                fault = RuntimeError(f"the broker failed to serve this request ({type(exc).__name__}); see its log")
                reply = {"t": "rerr", "id": msg["id"], "e": exception_to_wire(fault, with_traceback=False)}
            try:
                if one_fd >= 0:
                    self._send(reply, "worker stopped reading", one_fd=one_fd)
                else:
                    self._send(reply, "worker stopped reading", with_fds=bool(after) and reply["t"] == "rep")
            except MessageTooLarge as exc:  # (a listing of a huge directory, say): nothing was sent
                too_big = OSError(_errno.E2BIG, f"the answer does not fit in one message: {exc}")
                self._send({"t": "rerr", "id": msg["id"], "e": exception_to_wire(too_big, with_traceback=False)},
                           "worker stopped reading")
        finally:
            _release(after)  # the worker has its copies now

    def _answer_waiting(self) -> BaseException | None:
        """``_answer`` the request ``_steps`` left in ``_to_answer`` (on the
        broker's threads, for an awaited call); what it raised, or None."""
        assert self._to_answer is not None
        msg, outputs, over = self._to_answer
        with self._answering:
            if self.exit is not None:  # ended meanwhile (akill from another task): its fds are closed
                return self.exit.error(self.name)
            try:
                self._answer(msg, outputs, over_quota=over)
            except BaseException as exc:
                return exc
        return None

    def _send(self, msg: dict[str, Any], what: str, with_fds: bool = False, one_fd: int = -1) -> None:
        """Send to the worker; a worker that cannot be reached is ended.
        ``one_fd``: the message's one fd, already named in it by ``fd_marker``."""
        try:
            if one_fd >= 0:
                self._chan.send_one_fd(msg, one_fd)
            else:
                self._chan.send(msg, with_fds=with_fds)
        except ProtocolError as exc:
            deadline = self._chan.send_deadline
            if deadline is not None and time.monotonic() >= deadline:
                method, timeout = self._call_what
                raise self._fail("timeout", f"call {method}() ran past its {timeout:g} s timeout "
                                            "(the worker left what the broker sent it unread)") from exc
            raise self._fail("protocol", f"{what}: {exc}") from exc
        except OSError as exc:
            if exc.errno in _GONE:
                raise _ChannelGone from exc
            if raised_by_a_signal_handler(exc):
                raise
            raise self._fail("crashed", f"channel error: {exc}") from exc

    def _register_dir(
        self, cap: Capability, copy: bool = False, for_call: bool = False, held: bool = False
    ) -> DirRef:
        """Keep a directory for this worker; it gets only an id to name it.
        Takes ownership of ``cap`` unless ``copy``. ``for_call``: an argument
        of the call being sent, let go when that call ends (as file arguments
        are closed in the worker then); else the worker's until it closes the
        proxy (a ``dclose`` request) or ends. ``held``: counted in the fd
        budget (one the worker asked for), given back when let go."""
        if len(self._dirs) >= MAX_DIR_GRANTS:
            raise NotCapable(f"more than {MAX_DIR_GRANTS} directory grants for one worker")
        if copy:
            cap = Capability(os.dup(cap.fileno()), cap.rights, cap.kind, cap.name)
        ident = next(self._dir_ids)
        self._dirs[ident] = cap
        if for_call:
            self._call_dirs.append(ident)
        if held:
            self._held_dirs.add(ident)
        return DirRef(ident, cap.rights)

    def _release_dir(self, ident: int) -> None:
        cap = self._dirs.pop(ident, None)
        if cap is not None:
            cap.close()
        if ident in self._held_dirs:
            self._held_dirs.discard(ident)
            self._broker._fds.give_back(self, 1)

    def _call_ended(self) -> None:
        """Either driver, however its call ended: no call of ours is in flight,
        and the call's directory arguments go (the worker's proxies of them are closed)."""
        self._call_thread = None
        self._outputs_allowed = None
        self._chan.send_deadline = None
        self._listings.clear()
        if self._held_call:  # its outputs are committed or discarded by now
            held, self._held_call = self._held_call, 0
            self._broker._fds.give_back(self, held)
        if self._call_dirs:
            idents, self._call_dirs = self._call_dirs, []
            for ident in idents:
                self._release_dir(ident)

    def _wait(self, deadline: float | None) -> str:
        poller = self._poll_set()
        chan_fd = self._chan.fileno()
        if not self._drains:  # the common case: no pipe to fill, only the channel and the listener
            while True:
                if deadline is None:
                    events = poller.poll()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return "timeout"
                    events = poller.poll(max(1, int(left * 1000 + 0.999)))
                first = self._pick(events, chan_fd)
                if first is not None:
                    return first
        polled = set(self._drains)
        for fd in polled:
            poller.register(fd, select.POLLIN)
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return "timeout"
                events = poller.poll(None if remaining is None else max(1, int(remaining * 1000 + 0.999)))
                notify = False
                for fd, ev in events:
                    if fd == self._notify_fd:
                        if ev & select.POLLIN:
                            notify = True
                        else:
                            self._drop_notify()
                chan = any(fd == chan_fd for fd, _ in events)
                if notify and self._first(chan, notify) == "notify":
                    return "notify"
                for fd, _ in events:
                    if fd != chan_fd and fd in self._drains and not self._drains[fd].step():
                        poller.unregister(fd)
                        polled.discard(fd)
                        del self._drains[fd]
                if chan:
                    return "chan"
        finally:
            for fd in polled:
                # (one unregistered above, the interrupt raised before it was taken off `polled`:
                # a KeyError here hid the interrupt)
                with contextlib.suppress(KeyError):
                    poller.unregister(fd)

    # -- sandbox violations -----------------------------------------------
    def _idle_notification(self) -> float | None:
        """On the idle watch's thread: the listener has a notification, and no
        call may be waiting on it. Ended (or answered EPERM) here, as a call
        would. Returns when to ask again, if it could not be now: a call held
        the worker (that call ends it, or the watch asks again once it has
        let go), or an EPERM is due later: held to the request rate, as in a
        call (a worker made about 11,000 a second), and to 1/_IDLE_ERRNO_GAP
        a second, since between calls nothing ends a flood (one at 11,000 a
        second kept a broker CPU busy for ever; red-team round 40)."""
        if not self._lock.acquire(blocking=False):
            return time.monotonic() + _IDLE_RETRY
        try:
            return self._idle_notification_held()
        finally:
            self._lock.release()

    def _idle_notification_held(self) -> float | None:
        """``_idle_notification``, holding the call lock."""
        if self.exit is None and self._notify_fd >= 0 and notified_now(self._notify_fd):
            if self.violation == "errno":
                now = time.monotonic()
                if self._idle_due is None:
                    self._idle_due = max(self._throttle(1.0) or now, self._idle_last + _IDLE_ERRNO_GAP)
                if now < self._idle_due:
                    return self._idle_due
                self._idle_due, self._idle_last = None, now
            with contextlib.suppress(WorkerCrashed):  # (its end: recorded, logged, audited)
                self._on_notification()
        return None

    def _on_notification(self) -> None:
        from . import _notify

        try:
            note = _notify.receive(self._notify_fd)
        except OSError:
            return  # the target died or the notification went away
        args = tuple(note.args)
        call, hint = report(note.name, args, note.pid or self.pid)  # before answering: the worker is still blocked
        self._broker._audit(self, "violation", note.name, None, "denied", call)
        if self.violation == "errno":
            try:
                _notify.respond_errno(self._notify_fd, note.id, _errno.EPERM)
            except OSError:
                pass
            return
        self._kill()
        status = self._reap(timeout=5.0)
        self._set_exit(
            WorkerExit(
                "violation",
                f"the sandbox stopped it for syscall {call}{hint}",
                signal=os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None,
                syscall=note.name,
                args=args,
            )
        )
        assert self.exit is not None
        raise self.exit.error(self.name)

    # -- death ------------------------------------------------------------
    def _abandon(self, method: str, exc: BaseException) -> None:
        """The caller stopped waiting for a call that was sent (the task was
        cancelled, the thread interrupted). Its answer would come out of turn,
        and what it has half done is unknown: end the worker. (Outputs it
        created were discarded already.)"""
        self._pending_call = None
        if self.exit is None:
            how = "cancelled" if isinstance(exc, asyncio.CancelledError) else f"interrupted ({type(exc).__name__})"
            self._fail("cancelled", f"call {method}() was {how} before it answered, so the worker was stopped",
                       unless_ended=True)

    def _kill(self) -> None:
        with self._pidfd_lock:  # (the fd is not closed meanwhile: see __init__)
            if self._pidfd < 0:
                return  # reaped already
            self._sigkilled = True
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self, timeout: float) -> int | None:
        """Wait for the process to end; SIGKILL it if it does not in time.

        During an awaited call nothing is waited for: a process still running
        is killed and reaped in the background (its end is that SIGKILL), and
        a zygote is not asked for a status that the driver did not ask for
        first, off the loop (``_aended``)."""
        if self._pidfd < 0:
            return None
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        if self._awaited:
            if not poller.poll(0):
                # Killed here: its end is that SIGKILL, and nothing of it is waited for on the loop
                # (the process's teardown, its zygote's answer): 32 awaited calls cancelled at once,
                # each waited for a few ms, held the loop about 100 ms (a user trial).
                self._kill_now_reap_later()
                return _KILLED
            if self._status is _NOTHING and self._slow_reaper():
                # Ended by itself, its status not asked for off the loop first (the drivers do,
                # where they wait for an end: _aended): unknown, rather than a wait on the loop.
                self._kill_now_reap_later()
                return None
        elif not poller.poll(int(timeout * 1000)):
            self._kill()
            poller.poll(5000)
        if self._status is _NOTHING:  # (once reaped, its pid may be another's: _aended killed it before)
            self._kill_group()
        return self._reaped()

    def _reaped(self) -> int | None:
        """The exit status of the ended process, asked of the reaper once."""
        with self._reap_lock:
            if self._status is _NOTHING:
                self._status = self._reaper(self.pid)
            status: int | None = self._status
            return status

    def _slow_reaper(self) -> bool:
        """Is the status a round trip to the zygote (up to ~100 ms on a busy
        machine), not a wait for our own ended child (at once)?"""
        return self.spawn_method == "zygote"

    async def _aended(self, timeout: float) -> None:
        """Wait on the loop up to ``timeout`` for the process to end and, if it
        has, ask for its exit status off the loop (its zygote's answer took up
        to 130 ms with both CPUs busy): the synchronous code that records the
        end then finds both at once."""
        if self._pidfd < 0 or not await self._exited(timeout):
            return
        if self._status is _NOTHING and self._slow_reaper():
            self._kill_group()  # (before it is reaped: until then its pid is its group's id)
            # Not waited for if cancelled: whoever records the end then finds the status, or
            # has the worker reaped in the background (each asks once: _reaped).
            await asyncio.get_running_loop().run_in_executor(self._broker._background.status_lane(), self._reaped)

    def _kill_group(self) -> None:
        if self._may_fork:
            # Its own processes (allow-fork, or no sandbox) are in its process group, which they
            # cannot leave (setpgid and setsid are not in the filter); until it is reaped, its pid
            # is still that group's id.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def _kill_now_reap_later(self) -> None:
        """SIGKILL the worker (and its own processes) and let the broker's
        thread reap it: nothing of its end is waited for here."""
        self._kill()
        self._kill_group()
        self._reap_in_background()

    def _reap_in_background(self) -> None:
        """Hand the pidfd, the reaping and the cgroup to the broker's thread."""
        with self._pidfd_lock:
            pidfd, self._pidfd = self._pidfd, -1
        cgroup, self._cgroup = self._cgroup, None

        def reap() -> None:
            self._reaped()
            if cgroup is not None:
                cgroup.discard()

        self._broker._background.after_exit(pidfd, reap)

    def _set_exit(self, ex: WorkerExit, asked: bool = False) -> WorkerExit:
        """Record how the worker ended, once: the loop's thread (akill) and
        the executor thread answering a request for an awaited call may both
        learn of it. Returns the end recorded (``ex``, with the worker's last
        words when they were read, or the end recorded before). Logged as a
        WARNING unless it is ok or ``asked`` (the program ended it)."""
        with self._exit_lock:
            if self.exit is not None:
                return self.exit
            if ex.kind != "ok" and self._stderr_fd >= 0:
                words = self._last_words()
                if words:
                    ex = dataclasses.replace(ex, last_output=words)
            self.exit = ex
        # (only the thread that recorded the end gets here)
        self._on_idle_end = None  # (a pool's: no cycle left through an ended handle)
        self._release()
        self._broker._forget(self)
        # The methods __getattr__ cached hold this handle: let go of them, so that a handle
        # dropped after its end goes at once, not at the collector's next pass (a cycle of
        # about 28 objects a handle; red-team round 29). Called again, they are made anew.
        for name, value in list(self.__dict__.items()):
            if type(value) is functools.partial and value.func == self._call_known:
                del self.__dict__[name]
        level = logging.INFO if ex.kind == "ok" or asked else logging.WARNING
        if log.isEnabledFor(level):  # the same end, for a program reading the log (record.privsep)
            end = {"worker": self.id, "pid": self.pid, "class": self.cls.__qualname__, **dataclasses.asdict(ex)}
            log.log(level, "worker %s ended: %s (%s)", self.name, ex.kind, printable(ex.reason),
                    extra={"privsep": end})
        return ex

    def _last_words(self) -> str:
        """What the worker wrote to its stderr and did not read back before
        it ended (a fatal error's report, faulthandler's traceback), at most
        LAST_WORDS characters; each line is logged as its output is. Never
        blocks: one read of what is there (the worker may have made the pipe
        blocking, or sent another pipe)."""
        poller = select.poll()
        poller.register(self._stderr_fd, select.POLLIN)
        try:
            if not poller.poll(0):
                return ""
            data = os.read(self._stderr_fd, 64 * 1024)
        except OSError:
            return ""
        text = data.decode("utf-8", "backslashreplace")[-LAST_WORDS:]
        lines = [line for line in text.splitlines() if line.strip()]
        for line in lines[-_LAST_LINES:]:  # (4096 newlines would be 4096 records)
            self._log_output("stderr", line)
        return text

    def _release(self) -> None:
        self._stop_waiting()  # before its fds close under the event loop
        self._close_fds()
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None and self._awaited:
            self._broker._background.soon(cgroup.discard)  # (it may wait for the kernel: not on the loop)
        elif cgroup is not None:
            try:
                cgroup.remove()
            except OSError as exc:
                log.warning("worker %s: cannot remove its cgroup %s: %s", self.name, cgroup.path, exc)

    def _close_fds(self) -> None:
        """The channel, the directories it was given, the listener and the pidfd
        (after a request being answered on one of the broker's threads, if any)."""
        with self._answering:
            self._close_fds_now()

    def _close_fds_now(self) -> None:
        # Each step in a finally: a Ctrl-C raised in one (once a close or the watch's wake-up
        # has returned) left the pidfd and the listener open for good, the end being recorded
        # already (a probe: 5 of 200 kills and stops).
        try:
            self._chan.close()
            for d in self._dirs.values():
                d.close()
            self._dirs.clear()
            if self._held_dirs:
                self._broker._fds.give_back(self, len(self._held_dirs))
                self._held_dirs.clear()
        finally:
            try:
                self._unwatch()
                if self._exit_watched:
                    self._exit_watched = False
                    idle_watch.unwatch(self._pidfd)
            finally:
                with self._pidfd_lock:
                    pidfd, self._pidfd = self._pidfd, -1
                fds = [pidfd, self._notify_fd, self._stderr_fd]
                self._notify_fd = self._stderr_fd = -1
                close_each(fd for fd in fds if fd >= 0)

    def __del__(self) -> None:
        # Dropped without stop() (its broker dropped unclosed): the fd numbers it owns go with it.
        # (The channel is a socket object, which closes itself; the worker then sees EOF and ends.)
        if getattr(self, "exit", 0) is None and getattr(self, "_reaper", None) is _waitpid and self._pidfd >= 0:
            pidfd, self._pidfd = self._pidfd, -1
            _unwaited.append(pidfd)  # our own child: waited for later (the pidfd goes with it), no zombie
        for attr in ("_notify_fd", "_pidfd", "_stderr_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                setattr(self, attr, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __copy__(self) -> NoReturn:
        raise TypeError("a worker handle is its worker's one handle: it cannot be copied or pickled")

    def __deepcopy__(self, memo: object) -> NoReturn:
        self.__copy__()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        self.__copy__()

    def _fail(self, kind: str, reason: str, *, unless_ended: bool = False) -> WorkerCrashed:
        """Stop a worker that misbehaved or overran; return the error to raise.
        ``unless_ended``: one that had ended by itself already (its own exit,
        an outside kill, the OOM killer) is recorded as it ended (a call
        cancelled after that read "cancelled", its exit status lost; red-team
        round 33). (Not for an end whose reason the broker read from the
        worker, a protocol breach or its last words: that reason says more.)"""
        ended_before = unless_ended and self._ended_unasked()
        self._kill()
        status = self._reap(timeout=5.0)
        if ended_before:
            self._set_exit(self._own_end(status))
        else:
            sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
            self._set_exit(WorkerExit(kind, reason, signal=sig))
        assert self.exit is not None
        return self.exit.error(self.name)

    def _fail_from_os(self, exc: OSError) -> WorkerCrashed:
        """The handshake's receive failed (a call's sees the channel's end as EOF)."""
        if exc.errno in _GONE:
            return self._died(grace=self._handshake_grace())
        return self._fail("crashed", f"channel error: {exc}")

    def _handshake_grace(self) -> float:
        """How long an ended handshake waits for the worker to end: aspawn()
        waited on the loop already (``_aended``)."""
        return 0.0 if self._awaited else _EXIT_GRACE

    def _wait_exit(self, timeout: float) -> None:
        """Block until the process has ended, or ``timeout`` seconds."""
        if self._pidfd >= 0 and timeout > 0:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            poller.poll(int(timeout * 1000))

    def _died(self, grace: float = _EXIT_GRACE) -> WorkerCrashed:
        """The channel hit EOF: find out how the worker ended (waiting up to
        ``grace`` seconds for it to; one still running then is killed)."""
        if self._notify_fd >= 0 and ready_now(self._notify_fd):
            try:
                self._on_notification()
            except WorkerCrashed as exc:
                return exc
        self._wait_exit(grace)
        ran_on = self._pidfd >= 0 and not ready_now(self._pidfd)
        status = self._reap(timeout=0.0)
        ex = (
            self._exit_of(status)
            if status is not None
            else WorkerExit("crashed", _unknown_end(self.spawn_method))
        )
        if ran_on and self._ending is None:
            ex = WorkerExit("crashed", "worker closed its channel during a call and ran on (killed)",
                            signal=ex.signal)
        elif ex.kind == "ok" and self._ending is not None and self._ending.kind == "ok":
            ex = dataclasses.replace(self._ending, exit_code=ex.exit_code)  # (stopped by the broker's close())
        elif ex.kind == "ok":
            ex = WorkerExit("crashed", "worker closed its channel during a call", exit_code=ex.exit_code)
        # (the broker's own SIGKILL: an end asked for, set before it was sent; close() sets one before
        # its grace, in which the OOM killer's or an outside SIGKILL is not the broker's; round 33)
        asked = ex.kind == "signal" and ex.signal == signal.SIGKILL and self._ending is not None and self._sigkilled
        if asked:
            assert self._ending is not None
            ex = self._ending  # (kill() or stop() on another thread, while this call was in flight)
        else:
            ex = self._outside_kill(ex)
        return self._set_exit(ex, asked=asked).error(self.name)

    def _maybe_oom(self) -> bool:
        """Was a SIGKILL the kernel's OOM killer, acting on the worker's memory cgroup?"""
        return self._cgroup is not None and self._cgroup.oom_killed()

    def _outside_kill(self, ex: WorkerExit) -> WorkerExit:
        """``ex``, or the OOM killer's end where its SIGKILL came from that."""
        if ex.kind == "signal" and ex.signal == signal.SIGKILL and self._maybe_oom():
            assert self._cgroup is not None
            limit = _size(self._cgroup.limit)
            ex = WorkerExit("oom", f"killed by the OOM killer at its memory cgroup's limit ({limit})", signal=ex.signal)
        return ex

    def _own_end(self, status: int | None) -> WorkerExit:
        """How a worker that ended without the broker's doing ended, by its
        status. An exit status 0 is no stop (``ok`` is one the broker asked
        for): a worker gone by itself mid-life, whatever its status, is a
        crash to the program that used it, as it is to ProcessPoolExecutor;
        it read ``ok`` (and a pool counted it a recycle, not a crash)."""
        if status is None:
            return WorkerExit("crashed", _unknown_end(self.spawn_method))
        ex = self._outside_kill(self._exit_of(status))
        if ex.kind == "ok":
            return WorkerExit("crashed", "exited with status 0 by itself", exit_code=ex.exit_code)
        return ex

    def _record_kill(self, ending: WorkerExit, status: int | None, ended_before: bool) -> None:
        """Record the end of a worker the broker killed: as ``ending`` (its
        reason), unless it had ended by itself first, its process gone before
        the SIGKILL (``ended_before``) or its status another than that SIGKILL
        (kill() of a worker that had called os._exit(3) read "killed by the
        broker" with exit status 3). An end the program asked for is logged
        as INFO, not as a WARNING."""
        killed = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if status == 0 and self._stop_sent and not ended_before:  # (a stop that raced this kill ended it)
            self._set_exit(WorkerExit("ok", "stopped, exit status 0", exit_code=0))
        elif ended_before or (status is not None and not killed):
            self._set_exit(self._own_end(status))
        else:
            self._set_exit(dataclasses.replace(ending, signal=signal.SIGKILL if killed else None), asked=True)

    def _ended_unasked(self) -> bool:
        """Has the process ended though the broker asked it nothing (no stop
        message, no SIGKILL)? Then it ended by itself, or from outside. One
        the broker asked ended as asked, also where two end requests race
        (the second found the first's SIGKILL done and read it as an outside
        kill; red-team round 32). One whose zygote has died is ending: its
        parent-death signal is on its way, if not yet acted on (a worker slow
        to run read "stopped" though dead before its stop; a CI run)."""
        if self._stop_sent or self._sigkilled:
            return False
        ended = self._pidfd_ready()
        return ended is not None and (ended or self._orphaned())

    def _orphaned(self) -> bool:
        """Has its zygote died? Then so does it, once it runs."""
        return self._parent_gone is not None and self._parent_gone()

    def _ended_by_itself(self) -> bool:
        """Has this worker ended while no call of the broker ran (killed from
        outside, the OOM killer, a thread of its own that exited)? Then its end
        is recorded (waiting for a call of another thread to end first). So
        is that of one whose zygote has died, which it is dying with. One
        poll of its pidfd (and one of its zygote's channel): a pool asks
        before each task, which would otherwise fail on a worker that died
        while idle."""
        if self.exit is not None:
            return True
        # Under the call lock: the idle watch, which records ends holding it, closed the fds this
        # looked at in between (ValueError on a pidfd of -1; a CI run).
        with self._lock:
            if self.exit is not None:
                return True
            if self._pidfd < 0:
                return False
            if self._notify_fd >= 0 and notified_now(self._notify_fd):
                # A forbidden syscall of a thread the last call left running, that the idle watch
                # has not ended it for yet: ended now, not blamed on the next task (red-team round 40).
                self._idle_notification_held()
                if self.exit is not None:
                    return True
            if not ready_now(self._pidfd) and not self._orphaned():  # (dying: a task sent to it would fail)
                return False
            self._record_idle_end()
        return True

    def _idle_exit(self) -> float | None:
        """On the idle watch's thread: the process has ended. Its end is
        recorded (logged, its fds closed, its pool told) here, unless a call,
        stop or kill holds the worker: that records it; the watch asks again
        in a moment (``later``) or lets it be (None). An end the broker asked
        for (a stop, a kill) is its asker's to record."""
        if not self._lock.acquire(blocking=False):
            return time.monotonic() + _IDLE_RETRY
        try:
            if self._awaited:  # (an aspawn() finishing: its status is asked for off the loop)
                return time.monotonic() + _IDLE_RETRY
            if self.exit is not None or self._pidfd < 0 or self._stop_sent or self._sigkilled:
                return None
            if not ready_now(self._pidfd):
                # Not ended (the watch said so of another fd: never expected): watched on, never
                # killed here (the look at an end reaps at once, and kills what has not ended).
                idle_watch.watch(self._pidfd, self, pidfd=True)  # (a new entry: the watch forgets the old)
                return None
            hook = self._on_idle_end
            self._record_idle_end()
        finally:
            self._lock.release()
        if hook is not None:
            hook(self)
        return None

    def _record_idle_end(self) -> None:
        """(Holding the lock.) Record the end of a worker whose process ended
        while no call ran: a kill() of another thread, mid-way, as that; else
        as it ended."""
        status = self._reap(0.0)
        if self._sigkilled and self._ending is not None:
            self._record_kill(self._ending, status, ended_before=False)
            return
        self._set_exit(self._own_end(status))

    # -- lifecycle --------------------------------------------------------
    def stop(self, timeout: float = 2.0) -> WorkerExit:
        """Ask the worker to stop; kill it if it has not within ``timeout``.

        A call in flight on another thread gets ``timeout`` to finish; then the
        worker is killed and that call raises ``WorkerCrashed``. A call in
        flight on this thread (awaited on its event loop, or interrupted by a
        signal handler that stops the worker) cannot end while this blocks, so
        the worker is killed at once. On an event loop, ``await astop()``.
        """
        timeout = wait_timeout(timeout, "timeout", zero=True)
        return self._stop(timeout, timeout)

    def _stop(self, timeout: float, grace: float) -> WorkerExit:
        """``stop(timeout)``; ``grace`` is the one its caller gave, which an
        end by kill names: the broker's close(0) gives each worker a moment
        to obey (a kill is no clean stop), and its ends read "killed after
        the grace period" though it gave none (a claims audit)."""
        if self._call_thread == threading.get_ident():
            return self._end_during_call("ok", "stopped during a call (killed)")
        got = self._lock.acquire(timeout=timeout)
        if not got:
            self._ending = WorkerExit("ok", f"stopped during a call ({_killed_after(grace)})", signal=signal.SIGKILL)
            self._kill()  # the in-flight call sees EOF, reaps and records the exit
            if not self._lock.acquire(timeout=10.0):
                raise RuntimeError(f"worker {self.name}: in-flight call did not end after SIGKILL")
        try:
            if self.exit is not None:
                return self.exit
            # (the broker's close() sent its stop first: an exit 0 since then obeyed it)
            ended_before, before = self._ended_unasked(), (self._ending, self._sigkilled)
            self._stop_sent = True
            self._chan.try_send(STOP_MESSAGE)
            if self._notify_fd < 0 or self._pidfd < 0:
                return self._stopped(self._reap(timeout), ended_before, before, grace)
            if self._wait_end_or_violation(timeout):
                assert self.exit is not None
                return self.exit
            return self._stopped(self._reap(0.0), ended_before, before, grace)
        finally:
            self._lock.release()

    def _wait_end_or_violation(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a worker asked to stop to end, ending it
        for a forbidden syscall made meanwhile, as a call would: the idle
        watch cannot, the stop holding the call lock, and the end read
        "stopped", with no audit event (red-team round 40). True if that
        recorded its end. In errno mode the answers are spaced as between
        calls, and the grace ends at ``timeout`` however many the worker
        makes (a flood held stop() and close() for minutes; round 41)."""
        listener = self._notify_fd
        everything, pid_only = select.poll(), select.poll()
        for poller in (everything, pid_only):
            poller.register(self._pidfd, select.POLLIN)
        everything.register(listener, select.POLLIN)
        hung_up, next_answer = False, 0.0
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                if self.violation != "errno" and not hung_up and notified_now(listener):
                    with contextlib.suppress(WorkerCrashed):
                        self._on_notification()  # (made as the grace ran out: still its end)
                return self.exit is not None
            pacing = now < next_answer
            poller = pid_only if hung_up or pacing else everything
            until = min(deadline, next_answer) if pacing else deadline
            events = dict(poller.poll(max(0, math.ceil((until - now) * 1000))))
            if self._pidfd in events:
                return False
            ready = events.get(listener, 0)
            if ready & select.POLLIN:
                try:
                    self._on_notification()
                except WorkerCrashed:
                    return True
                next_answer = time.monotonic() + _IDLE_ERRNO_GAP  # (errno: answered, and the wait goes on)
            elif ready:
                hung_up = True  # no task of it left to make one

    def _stopped(self, status: int | None, ended_before: bool, before: tuple[WorkerExit | None, bool], grace: float
                 ) -> WorkerExit:
        """Record the end of a worker that was asked to stop. One whose process
        had ended before it was asked (``ended_before``) ended by itself:
        killed from outside or by the OOM killer, say (it read "stopped
        (killed after the grace period)" when no grace had run; red-team
        round 30), or by its own exit. One that a kill of another request
        ended (``before``: ``_ending`` and ``_sigkilled`` as the stop began;
        that kill's ``_ending`` set since, or its SIGKILL sent already) ended
        as that kill says, not as a stop's ``grace`` run out (red-team round 32)."""
        if ended_before:
            return self._set_exit(self._own_end(status))
        killed = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        other_kill = self._ending is not None and (self._ending is not before[0] or before[1])
        if other_kill and (status is None or killed):
            assert self._ending is not None
            sig = signal.SIGKILL if killed else None
            return self._set_exit(dataclasses.replace(self._ending, signal=sig), asked=True)
        if status is None:  # (not "exit status None": its zygote killed from outside, say)
            return self._set_exit(WorkerExit("ok", "stopped; " + _unknown_end(self.spawn_method)))
        ex = self._exit_of(status)
        if ex.kind == "ok":
            ex = WorkerExit("ok", f"stopped, exit status {ex.exit_code}", exit_code=ex.exit_code)
        if ex.kind != "ok" and ex.signal == signal.SIGKILL:
            if not self._sigkilled:
                # Not the broker's SIGKILL: one from outside (an administrator, the OOM killer) while
                # the stop waited read as the grace run out, and a pool's recycle took the crash for a
                # clean end, restart="never" unbroken (red-team round 43).
                return self._set_exit(self._outside_kill(ex))
            ex = WorkerExit("ok", f"stopped ({_killed_after(grace)})", signal=ex.signal)
        self._set_exit(ex)  # (unless it was recorded meanwhile)
        assert self.exit is not None
        return self.exit

    async def astop(self, timeout: float = 2.0) -> WorkerExit:
        """``stop()`` for asyncio: the worker's end is awaited on the event
        loop, which is never blocked for it. A call another task awaits gets
        ``timeout`` to finish; then the worker is killed and that call raises
        ``WorkerCrashed``."""
        timeout = wait_timeout(timeout, "timeout", zero=True)
        if self.exit is not None:
            return self.exit
        alock = self._loop_lock()
        try:
            async with asyncio.timeout(timeout):  # (not wait_for: see _readable)
                await alock.acquire()
        except TimeoutError:
            # The loop's lock is held by a task of this loop: its awaited call (the call lock this
            # thread's), or one waiting for the call lock that another thread's or loop's call holds.
            return await self._aend(WorkerExit("ok", f"stopped during a call ({_killed_after(timeout)})",
                                               signal=signal.SIGKILL))
        except BaseException:
            # Cancelled during the grace it gave a call in flight: the worker still ends (left
            # running, it kept its fds and its place among the broker's workers; red-team round 20).
            # The call's owner records the end, as after kill() from another task.
            cancelled = WorkerExit("ok", "stopped (killed: its astop() was cancelled)", signal=signal.SIGKILL)
            if self.exit is None:
                if self._call_thread == threading.get_ident():
                    self._end_during_call(cancelled.kind, cancelled.reason)
                else:
                    if self._ending is None:
                        self._ending = cancelled
                    self._kill()
            raise
        try:
            if self.exit is not None:
                return self.exit
            if not self._lock.acquire(blocking=False):  # a synchronous call on another thread
                return await _on_a_thread_of_its_own(functools.partial(self.stop, timeout), f"astop {self.name}")
            # Held across awaits: a kill() or stop() of another task on this loop must not
            # wait for it (the loop would be blocked); as with an awaited call, they end the
            # worker at once, waiting for nothing of it on the loop, and the wait below sees it go.
            self._call_thread = threading.get_ident()
            self._awaited = True
            try:
                ended_before, before = self._ended_unasked(), (self._ending, self._sigkilled)
                self._stop_sent = True
                self._chan.try_send(STOP_MESSAGE)
                try:
                    exited = await self._exited_or_violation(timeout)
                    if exited is None:
                        assert self.exit is not None
                        return self.exit
                    if not exited:
                        self._kill()
                    await self._aended(5.0)
                except BaseException:
                    # Cancelled (a client gone, a wait_for): the worker still ends, killed and reaped
                    # in the background, never left with its fds and its place among the broker's
                    # workers (a user trial: 50 cancelled astop()s, 150 fds and 50 handles kept).
                    if self.exit is None and self._pidfd >= 0 and ready_now(self._pidfd) and not self._sigkilled:
                        # Ended before the cancel (obeying, or by itself: an exit 3, a SIGSEGV, the OOM
                        # killer), unseen: recorded as it ended, once its status is asked for off the
                        # loop. It read "killed: its astop() was cancelled", SIGKILL (red-team round 44).
                        self._broker._background.soon(
                            functools.partial(self._record_stop, ended_before, before, timeout))
                    elif self.exit is None:
                        self._kill_now_reap_later()
                        self._set_exit(WorkerExit("ok", "stopped (killed: its astop() was cancelled)",
                                                  signal=signal.SIGKILL))
                    raise
                return self._stopped(self._reap(0.0), ended_before, before, timeout)
            finally:
                self._awaited = False
                self._call_thread = None
                self._lock.release()
        finally:
            alock.release()

    def _record_stop(self, ended_before: bool, before: tuple[WorkerExit | None, bool], grace: float) -> None:
        """On a thread of the broker's: record the end of a worker that ended
        while a cancelled astop() waited (once that has let go of the lock)."""
        with self._lock:
            if self.exit is None:
                self._stopped(self._reap(0.0), ended_before, before, grace)

    def _loop_lock(self) -> asyncio.Lock:
        """The lock that orders this handle's awaited calls on the running loop."""
        return self._alock.get()

    async def akill(self) -> WorkerExit:
        """``kill()`` for asyncio: the worker's end is awaited on the event loop."""
        return await self._aend(WorkerExit("signal", "killed by the broker", signal=signal.SIGKILL))

    async def _aend(self, ending: WorkerExit) -> WorkerExit:
        """End the worker from the event loop as ``kill()`` does, recorded as
        ``ending``, never blocking the loop. A call in flight records the end
        itself, and closes the fds it uses, before this takes the call lock
        (astop()'s grace, run out, ended a worker under another thread's
        call: its fds closed under that call, the end recorded as an outside
        SIGKILL; red-team round 19). So does a call another task of this loop
        awaits: it learns the worker's status off the loop, and a worker that
        ended by itself just before the SIGKILL is recorded as it ended, not
        as ``ending`` (recorded at once, without its status, the end of a
        zygote worker already gone read signal None in half the runs, and a
        worker's own os._exit(3) read "killed by the broker"; red-team round 29)."""
        if self.exit is not None:
            return self.exit
        ended_before = self._ended_unasked()
        if self._ending is None and not ended_before:  # (a call in flight records its end as this)
            self._ending = ending
        self._kill()
        if self._call_thread == threading.get_ident() and self._pending_call is None:
            # astop() of this loop holds the lock, waiting for the end it asked for. The status is
            # asked for off the loop first: recorded at once, the end of one that died before the
            # look read signal None (a CI run). Whichever records it, this or that astop() once its
            # wait sees the end, records it as this kill (_ending; _stopped).
            await self._aended(5.0)
            if self.exit is None:
                self._record_kill(self._ending or ending, self._reap(5.0), ended_before)
            assert self.exit is not None
            return self.exit
        try:
            await self._aended(5.0)
            async with asyncio.timeout(10.0):
                await self._lock_from_loop()
        except TimeoutError:
            raise RuntimeError(f"worker {self.name}: in-flight call did not end after SIGKILL") from None
        except BaseException:  # cancelled: with no call to record it, the end is recorded here
            if self.exit is None and self._lock.acquire(blocking=False):
                try:
                    self._kill_now_reap_later()
                    self._set_exit(self._ending or ending)
                finally:
                    self._lock.release()
            raise
        try:
            if self.exit is None:
                self._awaited = True  # (one not gone yet is reaped in the background)
                try:
                    status = self._reap(5.0)
                finally:
                    self._awaited = False
                self._record_kill(self._ending or ending, status, ended_before)
            assert self.exit is not None
            return self.exit
        finally:
            self._lock.release()

    def _chan_ended(self) -> bool:
        """Is the channel at its end (EOF, or reset), the worker ending? Never waits."""
        try:
            return not self._chan.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            return exc.errno in _GONE

    async def _exited_or_violation(self, timeout: float) -> bool | None:
        """``_exited()`` for astop(), which holds the call lock: a forbidden
        syscall made meanwhile ends the worker, as a call would (None then).
        The listener is looked at every _IDLE_RETRY seconds."""
        if self._notify_fd < 0:
            return await self._exited(timeout)
        deadline = time.monotonic() + timeout
        while True:
            if await self._exited(min(_IDLE_RETRY, max(0.0, deadline - time.monotonic()))):
                return True
            if self._notify_fd >= 0 and notified_now(self._notify_fd):
                with contextlib.suppress(WorkerCrashed):
                    self._on_notification()  # (errno: answered, and the wait goes on)
                if self.exit is not None:
                    return None
            if time.monotonic() >= deadline:
                return False

    async def _exited(self, timeout: float) -> bool:
        """Wait on the event loop until the process has ended; False after
        ``timeout``. On a copy of the pidfd, taken under its lock: akill()
        waits here without the call lock (see _pidfd_ready)."""
        with self._pidfd_lock:
            if self._pidfd < 0 or ready_now(self._pidfd):
                return True
            own = os.dup(self._pidfd)
        try:
            return await readable(own, timeout)
        finally:
            os.close(own)

    def kill(self) -> WorkerExit:
        """Kill the worker now. A call in flight raises ``WorkerCrashed``."""
        if self.exit is not None:
            return self.exit
        if self._call_thread == threading.get_ident():
            return self._end_during_call("signal", "killed by the broker")
        ending = WorkerExit("signal", "killed by the broker", signal=signal.SIGKILL)
        ended_before = self._ended_unasked()
        if not ended_before:  # (a call in flight records its end as this; one gone already, as it ended)
            self._ending = ending
        self._kill()
        # A call in flight on another thread sees the channel end and records
        # the exit itself; its fds must not close under it.
        if not self._lock.acquire(timeout=10.0):
            raise RuntimeError(f"worker {self.name}: in-flight call did not end after SIGKILL")
        try:
            if self.exit is None:
                self._record_kill(ending, self._reap(5.0), ended_before)
            assert self.exit is not None
            return self.exit
        finally:
            self._lock.release()

    def _end_during_call(self, kind: str, reason: str) -> WorkerExit:
        """End the worker while a call of this thread is in flight, holding the
        call lock: awaited on the event loop (recording the exit wakes it) or
        interrupted by a signal handler. That call then raises the exit."""
        if self.exit is None:
            ended_before = self._ended_unasked()
            self._kill()
            self._record_kill(WorkerExit(kind, reason), self._reap(5.0), ended_before)
        assert self.exit is not None
        return self.exit

    def _forked_copy(self, reason: str) -> None:
        """In a forked child: close this copy's fds of the parent's worker and
        refuse calls. Its process, cgroup and end stay the parent's."""
        self._lock = threading.Lock()  # (a call on another thread may have held it at the fork)
        self._answering = threading.RLock()  # (and an executor thread these)
        self._exit_lock = threading.Lock()
        self._reap_lock = threading.Lock()
        self._alock = PerLoopLock()
        self._waiting = None
        self._cgroup = None  # never removed from here
        self._foreign = True
        self._close_fds()
        self.exit = WorkerExit("crashed", f"not this process's worker: {reason} (spawn workers of its own here)")

    def _adopt_notify(self, fd: int) -> None:
        self._notify_fd = fd
        self._poller = None
        idle_watch.watch(fd, self)
        self._watched = True

    def _watch_exit(self) -> None:
        """Ready: from now on an end while idle is recorded at once."""
        with self._lock:
            if self.exit is None and self._pidfd >= 0 and not self._exit_watched:
                idle_watch.watch(self._pidfd, self, pidfd=True)
                self._exit_watched = True

    def _exit_of(self, status: int) -> WorkerExit:
        """How a worker that ended by ``status`` ended, by what the broker knows
        of it. SIGXCPU is a CPU time limit's only where one was set: a worker
        can send it itself (a red-team worker made its end read as a timeout
        under no limit). (SIGSYS stays a violation: the filter's architecture
        check kills with it, unreported; a worker sending it itself gains
        nothing over making a forbidden call.)"""
        ex = WorkerExit.from_status(status)
        if ex.kind == "timeout" and not self._cpu_limited:
            name = signal.Signals(ex.signal or 0).name
            return WorkerExit("signal", f"killed by {name}, which it can send itself", signal=ex.signal)
        return ex


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


_NOTHING = object()
_GONE = (_errno.EPIPE, _errno.ECONNRESET, _errno.ENOTCONN)  # the worker closed its end


class _ChannelGone(Exception):
    """A send found the worker's end of the channel closed: the worker is
    ending, and is treated as at EOF (see ``_ended``)."""


def _killed_after(grace: float) -> str:
    """How a stop that had to kill ended: with no grace given (a cancelled
    ``async with Broker`` closes so), there was none to run out."""
    return "killed after the grace period" if grace > 0 else "killed"


def _unknown_end(spawn_method: str) -> str:
    if spawn_method == "zygote":
        return ("channel closed; exit status unknown: the zygote that reaps it did not report one"
                " (a zygote that dies takes its workers with it)")
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
        return ("channel closed; exit status unknown: this process ignores SIGCHLD, so the kernel"
                " reaped the worker (spawn='zygote' reports it)")
    return "channel closed; exit status unknown (the process was reaped already)"


class _Received:
    """An event carrying a message the sync driver already received."""

    __slots__ = ("msg",)

    def __init__(self, msg: Any):
        self.msg = msg


#: What ``handle.<name>`` reaches on the handle itself, never a worker's @rpc method of that name.
HANDLE_NAMES = frozenset(
    {n for n in dir(WorkerHandle) if not n.startswith("_")}
    | {"id", "cls", "pid", "timeout", "violation", "sandbox", "spawn_method", "exit", "calls"}
)
MAX_DIR_GRANTS = 1024
_YIELD_EVERY = 8
LAST_WORDS = 4096  # characters of a dead worker's stderr kept (WorkerExit.last_output)
_LAST_LINES = 64  # of them, the lines logged
_SCANS = frozenset({"listdir", "dlist"})  # requests that may read a whole directory
_QUEUED_AT_END = 16  # messages read once the channel's end is found (a queue holds 10 by default)
_HEAVY_ARG = 1 << 20  # bytes of arguments that an awaited call packs on one of the broker's threads
_WALK = 256  # items of nested arguments looked at on the loop, at most (about 60 us)
_BUFFERS_AND_CONTAINERS = (bytes, str, bytearray, memoryview, list, tuple, dict)
_TURN = 0.002  # seconds an awaited call may hold the loop before it lets the others run
_IDLE_RETRY = 0.02  # seconds before the idle watch asks again about a notification a call held
_IDLE_ERRNO_GAP = 0.01  # seconds at least between two EPERM answers between calls (100 a second)


def _commit(outputs: list[PendingOutput]) -> Exception | None:
    """Commit a call's outputs (all or none); the error, or None."""
    try:
        commit_all(outputs)
    except Exception as exc:
        return exc
    return None


_T = TypeVar("_T")


def _finished(deferred: Deferred | None) -> Any:
    """A Deferred message finished (its blobs read and checked); the error
    instead, sent back to the state machine."""
    assert deferred is not None
    try:
        return deferred.finish()
    except Exception as exc:  # (ProtocolError: the worker is ended on the loop's thread)
        return exc


async def _off_loop(
    work: Callable[[], _T], threads: Executor, *, undo: Callable[[_T], object] | None = None
) -> _T:
    """``work()`` on one of ``threads``. A cancel meanwhile waits for it to
    end (it is not interruptible), then is raised, after ``undo(result)``
    when the work succeeded (what it made is the caller's, who is not told)."""
    done = asyncio.get_running_loop().run_in_executor(threads, work)
    cancelled: tuple[Any, ...] | None = None  # the cancel's args (its message), not the exception: no cycle
    while not done.done():
        try:
            await asyncio.wait({done})
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc.args
    if cancelled is not None:
        if undo is not None and done.exception() is None:
            undo(done.result())
        raise asyncio.CancelledError(*cancelled)
    return done.result()


async def _on_a_thread_of_its_own(work: Callable[[], _T], name: str) -> _T:
    """``work()`` on a new thread, awaited: never one of the loop's default
    executor (the program's, which it may fill) nor of the broker's pool
    (its awaited calls need those). A cancel is raised at once; the work
    goes on to its end, as it would on an executor's thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if not done.done():
            if exc is None:
                done.set_result(result)  # type: ignore[arg-type]
            else:
                done.set_exception(exc)

    def run() -> None:
        result: _T | None = None
        failed: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:
            failed = exc
        with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile: nobody waits)
            loop.call_soon_threadsafe(settle, result, failed)

    threading.Thread(target=run, name=f"privsep-{name}", daemon=True).start()
    return await done


def _release(objs: list[Any]) -> None:
    for obj in objs:
        release = getattr(obj, "release", None) or getattr(obj, "close", None)
        if release is not None:
            release()


def _waitpid(pid: int) -> int | None:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


#: Forked workers (children of this process) whose handle went without their
#: end being waited for (a Broker dropped unclosed), by pidfd (a pid could be
#: reused once another waiter took it): each ends on its own when its channel
#: closes, and is waited for here later, not left a zombie. (An exec'd
#: worker's Popen is reaped by subprocess itself; a zygote's worker by its
#: zygote.)
_unwaited: list[int] = []


def reap_dropped() -> None:
    """Wait for those of ``_unwaited`` that have ended (never blocks)."""
    for _ in range(len(_unwaited)):
        try:
            pidfd = _unwaited.pop(0)
        except IndexError:  # (another thread took the last one)
            return
        try:
            done = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None
        except ChildProcessError:
            done = True
        if done:
            os.close(pidfd)
        else:
            _unwaited.append(pidfd)


class _Async:
    def __init__(self, handle: WorkerHandle, timeout: float | None, outputs: frozenset[str] | None = None):
        self._handle = handle
        self._timeout = timeout
        self._outputs = outputs

    def with_timeout(self, seconds: float | None) -> _Async:
        return _Async(self._handle, call_timeout(seconds, "timeout"), self._outputs)

    def with_outputs(self, *paths: str | os.PathLike[str]) -> _Async:
        return _Async(self._handle, self._timeout, output_paths(paths))

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._handle._acall(method, args, kwargs, self._timeout, self._outputs)
        except BaseException:
            del args, kwargs  # (kept by the traceback otherwise: see WorkerHandle._call_known)
            raise

    def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        handle = self._handle
        if name.startswith("_") or name not in getattr(handle.cls, "rpc_methods", ()):
            raise AttributeError(f"{handle.cls.__name__} has no @rpc method {name!r}")
        return lambda *args, **kwargs: handle._acall(name, args, kwargs, self._timeout, self._outputs)


class _Timed:
    """A view of a handle whose calls have a timeout, or outputs named ahead, of their own."""

    def __init__(self, handle: WorkerHandle, timeout: float | None, outputs: frozenset[str] | None = None):
        self._handle = handle
        self._timeout = timeout
        self._outputs = outputs

    @property
    def aio(self) -> _Async:
        """The async face with this view's settings: ``await handle.with_timeout(5).aio.method()``."""
        return _Async(self._handle, self._timeout, self._outputs)

    def with_timeout(self, seconds: float | None) -> _Timed:
        return _Timed(self._handle, call_timeout(seconds, "timeout"), self._outputs)

    def with_outputs(self, *paths: str | os.PathLike[str]) -> _Timed:
        return _Timed(self._handle, self._timeout, output_paths(paths))

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        self._handle._check_method(method)
        try:
            return self._handle._call(method, args, kwargs, self._timeout, self._outputs)
        except BaseException:
            del args, kwargs  # (kept by the traceback otherwise: see WorkerHandle._call_known)
            raise

    def __getattr__(self, name: str) -> Callable[..., Any]:
        handle = self._handle
        if name.startswith("_") or name not in getattr(handle.cls, "rpc_methods", ()):
            raise AttributeError(f"{handle.cls.__name__} has no @rpc method {name!r}")
        return functools.partial(self._call_named, name)

    def _call_named(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._handle._call(method, args, kwargs, self._timeout, self._outputs)
        except BaseException:
            del args, kwargs  # (kept by the traceback otherwise: see WorkerHandle._call_known)
            raise


def output_paths(paths: tuple[str | os.PathLike[str], ...]) -> frozenset[str]:
    """The outputs a call may create, as the broker names a request's path.
    An output is a file: a path ending in ``/`` (a directory's) is refused."""
    named = []
    for p in paths:
        text = local_path(p, what="output path")
        if text.endswith("/"):
            raise ValueError(f"an output is a file, not a directory: {text!r} (name each file the call may create)")
        try:
            parts = split_relative(text)
        except NotCapable as exc:  # (the caller's own mistake, said where it is made, not at the call)
            raise ValueError(f"output {text!r}: {exc.strerror}") from None
        if not parts:
            raise ValueError(f"an output path names a file beneath the broker's root, not {text!r}")
        named.append("/".join(parts))
    return frozenset(named)


__all__ = ["WorkerHandle"]
