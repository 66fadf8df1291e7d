"""The broker: keeps the authority, spawns workers, answers their requests."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import functools
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from protocol import NotCapable, ProtocolError, RemoteError, Rights, UnsupportedRights, WorkerCrashed
from protocol._messages import check_message
from protocol._paths import local_path, split_relative
from protocol._remote import exception_from_wire
from protocol._rights import rights_arg, rights_from_wire
from protocol._wire import (
    CHECK_BLOB_LEN,
    INT_MAX,
    INT_MIN,
    KIND_DIR,
    KIND_FILE,
    MAX_DEPTH,
    PROTOCOL_VERSION,
    SCALAR_TYPES,
    Channel,
    ReceivedFd,
    check_plain,
    check_sendable,
)
from worker import Worker
from worker._files import access_flags
from worker._mainref import check_not_importing, is_main_ref, module_ref
from worker._serve import grant_slots
from worker.sandbox import SandboxSpec
from worker.sandbox._rights_table import (
    DIR_RIGHTS,
    NO_TRUNCATE,
    PIPE_READ,
    PIPE_WRITE,
    PLAIN,
    SOCKET_RIGHTS,
    later_file_plan,
    spawn_dir_check,
)

from ._background import Background
from ._budget import FdBudget
from ._capability import Capability
from ._cgroup import CgroupSupport, WorkerCgroup
from ._cgroup import probe as cgroup_probe
from ._deliver import Drain, Opener, Outgoing, deliver
from ._exit import SETUP_FAILED, WorkerExit
from ._handle import (
    _EXIT_GRACE,
    HANDLE_NAMES,
    STOP_MESSAGE,
    WorkerHandle,
    _off_loop,
    _size,
    _waitpid,
    close_fds_in,
    reap_dropped,
)
from ._idle_watch import idle_watch
from ._interp import checked_environ, child_env
from ._lifeline import new_lifeline
from ._logtext import bounded, printable, short_repr
from ._loop import PerLoopLock
from ._options import call_timeout as checked_call_timeout
from ._options import count, rate, wait_timeout
from ._outputs import PendingOutput
from ._policy import Policy
from ._pool import WorkerPool
from ._resolve import Resolver, Target
from ._spawn import fork_worker
from ._zygote import SPAWN_METHODS, CannotImport, Zygote, exec_worker, importable

audit_log = logging.getLogger("privsep.audit")
_WRITES = Rights.WRITE | Rights.APPEND | Rights.FTRUNCATE  # what an open may not ask for in a with_outputs() call
log = logging.getLogger("privsep.broker")
_OPEN_BASE = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
_EXISTED = object()  # _dispatch's answer to a mkdir(exist_ok=True) that found the directory there
MAX_SPAWN_GRANTS = 64


class _Unsandboxed:
    """Named dangerous option: run workers with no sandbox at all."""

    def __repr__(self) -> str:
        return "UNSANDBOXED"


#: Pass as ``Broker(..., sandbox=UNSANDBOXED)`` to run workers with no sandbox
#: (benchmark baselines, debugging). Never for hostile input.
UNSANDBOXED = _Unsandboxed()


def _forked_reason(parent: int) -> str:
    return f"process {parent} made it, and this process ({os.getpid()}) is a fork of that one"


_brokers: weakref.WeakSet[Broker] = weakref.WeakSet()
_CLOSED_WHILE_STARTING = "broker is closed (it was closed while this worker started)"


def _after_fork_in_child() -> None:
    # multiprocessing's fork start method, a pre-forking server (gunicorn --preload), a bare os.fork():
    # a copied Broker must not talk to its parent's zygote or workers, nor wait on its locks.
    for broker in list(_brokers):
        broker._let_go_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_at_exit() -> None:
    """At interpreter exit, once the program's own threads have ended: the
    work queued on a pool never shut down is finished, as ProcessPoolExecutor
    finishes it (a Ctrl-C meanwhile gives it up), then every Broker of this
    process left open is closed, so its workers end and are waited for rather
    than orphaned."""
    mine = [b for b in list(_brokers) if b._pid == os.getpid()]
    for b in mine:  # a close left to a thread (a cancelled aclose()): finished, not cut off by the exit
        if b._closed and not b._wait_closed(10.0):
            log.warning("at exit: a Broker's close did not finish within 10 s")
    live = [b for b in mine if not b._closed]
    try:
        for b in live:
            for pool in list(b._pools):
                pool.shutdown(wait=True)
    except KeyboardInterrupt:
        log.warning("interrupted at exit: the work still queued on privsep pools is given up")
    for b in live:
        try:
            b.close()
        except Exception:
            log.exception("closing a Broker at exit failed")


atexit.register(_close_at_exit)


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _page(names: list[str], at: int) -> tuple[list[str], int]:
    """The names from ``at`` that fit one packet, and where the next page
    starts (0: none). Never a memfd: a worker could keep one unread, holding
    pages the broker wrote and its own limits do not count."""
    page: list[str] = []
    size, i = 0, at
    while i < len(names):
        size += len(names[i].encode()) + 5
        if page and size > LISTING_PAGE:
            break
        page.append(names[i])
        i += 1
    return page, (i if i < len(names) else 0)


_EXECUTOR_OPTIONS = {
    "max_workers": "the pool's size is size= (pool(Cls, size=n))",
    "initializer": "the worker class's setup() runs in each worker before its first task",
    "initargs": "the worker class's setup() runs in each worker before its first task",
    "mp_context": "workers are started by privsep's zygote (Broker(spawn=...) chooses how)",
    "max_tasks_per_child": "recycle_after=N replaces a worker after N calls",
}
LISTING_PAGE = 60 * 1024  # bytes of names in one reply (a packet holds 64 KiB)
MAX_LISTINGS = 2  # listings of one worker the broker keeps between its pages, during a call


_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = tuple(os.path.join(_TOP, d) + os.sep for d in ("broker", "worker", "protocol"))
# What runs the caller's code on a thread or a loop: not the caller either.
_STDLIB = os.path.dirname(os.__file__)
_RUNNERS = (os.path.join(_STDLIB, "asyncio") + os.sep, os.path.join(_STDLIB, "concurrent") + os.sep, threading.__file__)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's own line:
    past every frame of privsep's packages (and of asyncio, concurrent.futures
    and threading running them), whatever path led here. (The caller of this
    function is frame 1.)"""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OWN_DIRS + _RUNNERS):
        frame = frame.f_back
        level += 1
    return level


def _close_on_a_thread(broker: Broker) -> None:
    """Close a broker nobody will use (its astart() was cancelled) without
    waiting for it here."""
    threading.Thread(target=broker.close, name="privsep-close", daemon=True).start()


def _warn_hidden(cls: type[Worker]) -> None:
    """An @rpc method named like an attribute of its handle (``stop``,
    ``name``, ``call``, ...) is not what ``handle.stop()`` reaches. (Checks
    first that ``cls`` is a Worker class at all.)"""
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise TypeError(f"spawn() takes a Worker subclass, not {cls!r}")
    hidden = sorted(cls.rpc_methods & HANDLE_NAMES)
    if hidden:
        listed = ", ".join(f"{cls.__name__}.{n}" for n in hidden)
        warnings.warn(
            f"@rpc method{'s' if len(hidden) > 1 else ''} {listed} share{'' if len(hidden) > 1 else 's'} a name "
            f"with the worker handle's own attributes: handle.{hidden[0]} is the handle's; call the method "
            f"with handle.call({hidden[0]!r}, ...), or rename it",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


_NO_ROOM = (errno.EAGAIN, errno.ENOMEM)  # what a spawn's fork or exec meets at a process or memory limit


class Broker:
    """Keeps the process's authority and hands out what the policy allows.

    Use it as a context manager; leaving the block stops every worker within
    a bounded time. Paths in the policy and in requests are beneath ``root``.

    Workers get the broker's environment variables, which a compromised
    worker can read and say back. ``environ`` replaces them: the whole
    environment of the zygote, of exec'd workers and of forked ones (whose
    memory still holds the broker's, as all of its memory), ``setup()``
    included; ``PYTHONPATH`` is always the broker's import path (and
    ``LC_CTYPE=C.UTF-8`` where none of them sets a locale, PEP 538).

    A worker's ``print()`` goes nowhere, unless ``worker_output``: then each
    line it writes to ``sys.stdout`` or ``sys.stderr`` while a call runs (and
    those written before, in ``setup()`` or between calls, up to 64 KiB) is
    a record on the ``privsep.worker`` logger (INFO for stdout, WARNING for
    stderr), escaped, and held to ``request_rate`` as requests are.
    """

    def __init__(
        self,
        policy: Policy,
        root: str | os.PathLike[str] = ".",
        *,
        call_timeout: float | None = None,
        spawn_timeout: float = 30.0,
        sandbox: Any = None,
        spawn: str = "auto",
        request_rate: float | None = 20_000.0,
        max_requests_per_call: int = 10_000,
        max_outputs_per_call: int = 256,
        cgroup_parent: str | None = None,
        environ: Mapping[str, str] | None = None,
        worker_output: bool = False,
    ):
        check_not_importing()
        reap_dropped()  # forked workers of brokers dropped unclosed
        if not isinstance(worker_output, bool):
            raise TypeError(f"worker_output must be True or False, not {worker_output!r}")
        self.worker_output = worker_output
        self._environ = checked_environ(environ)
        if not isinstance(policy, Policy):
            raise TypeError("Broker needs a Policy")
        self._policy = policy
        self._weaker = int(policy.weaker)  # read per delivered file; enum conversion costs
        self.call_timeout = checked_call_timeout(call_timeout, "call_timeout")
        self.spawn_timeout = wait_timeout(spawn_timeout, "spawn_timeout")
        if spawn not in SPAWN_METHODS:
            raise ValueError(f"spawn must be one of {SPAWN_METHODS}")
        self.spawn_method = spawn
        self._zygote: Zygote | None = None
        # Workers forked or exec'd from here arm on it (worker._lifeline): made with the broker,
        # not at the first such spawn, so its fds are the same from now on to close().
        self._lifeline = new_lifeline() if spawn in ("fork", "exec", "auto") else None
        self._zygote_loaded: weakref.WeakSet[type[Worker]] = weakref.WeakSet()  # main-script classes it imported
        self._fork_only: weakref.WeakSet[type[Worker]] = weakref.WeakSet()  # main-script classes it could not
        # per worker, requests/s (burst = 1 s worth); None = unlimited
        self.request_rate = rate(request_rate, "request_rate")
        self.max_requests_per_call = count(max_requests_per_call, "max_requests_per_call", zero=True)
        # each pending output holds two broker fds
        self.max_outputs_per_call = count(max_outputs_per_call, "max_outputs_per_call", zero=True)
        self.last_sandbox: dict[str, Any] = {}
        self._unsandboxed = sandbox is UNSANDBOXED
        if sandbox is not None and not self._unsandboxed:
            raise TypeError("sandbox= takes only UNSANDBOXED; set sandbox options on the Policy")
        self._resolver = Resolver(policy, root)
        self._workers: dict[int, WorkerHandle] = {}
        # Started, handshake not done: not yet workers of the broker, but a fork must let go of them too.
        self._starting: weakref.WeakSet[WorkerHandle] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._prepared: dict[SandboxSpec, Any] = {}
        self._opener_proc: Opener | None = None
        self._abi: int | None = None
        self._pools: list[WorkerPool] = []
        self._background = Background()  # reaping that an event loop must not wait for
        self._fds = FdBudget(policy.limits.open_files)  # broker fds held for workers' requests
        self._aspawn_lock = PerLoopLock()  # orders this broker's awaited spawns, per loop
        self._spawn_lock = threading.Lock()
        self._cgroup_parent = cgroup_parent
        self._cgroups: CgroupSupport | None = None
        self._closed = False
        self._close_done = threading.Event()  # set once a close has finished
        self._closer: int | None = None  # the thread closing
        self._close_cut = False  # a close was interrupted before it had ended everything: the next one goes on
        self._pid = os.getpid()
        _brokers.add(self)
        if spawn in ("zygote", "auto"):
            # Start it now: its interpreter boots while the caller goes on.
            self._zygote = Zygote(self._spare_cgroup, self._environ)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == os.getpid():
            n = len(self._workers)
            how = "1 worker ends as its channel closes" if n == 1 else f"{n} workers end as their channels close"
            warnings.warn(
                f"a Broker was never closed (use 'with Broker(...)' or close()): its {how}",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    # -- context ----------------------------------------------------------
    def __enter__(self) -> Broker:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Left by Ctrl-C: the user wants out now, and a Ctrl-C at the terminal never reaches the
        # workers (each leads its own process group), so busy ones would be waited for.
        self.close(0.0 if exc_type is KeyboardInterrupt else 2.0)

    def close(self, timeout: float = 2.0) -> None:
        """Stop every worker (killing those that do not stop within
        ``timeout``) and release the broker's directory fds."""
        timeout = wait_timeout(timeout, "timeout", zero=True)
        if self._closed:
            with self._lock:
                go_on, self._close_cut = self._close_cut and self._closer is None, False
            if not go_on:
                self._wait_closed()
                return
        self._closed = True
        self._close_rest(timeout)

    def _wait_closed(self, timeout: float | None = None) -> bool:
        """Wait for a close in progress (another thread's, or the one a
        cancelled aclose() left to a thread) to finish: a close() that returns
        has closed. Not on the closing thread itself (a callback it runs)."""
        if self._closer == threading.get_ident():
            return True
        return self._close_done.wait(timeout)

    def _close_rest(self, timeout: float) -> None:
        """``close()`` once ``_closed`` is set (no spawn starts after that)."""
        self._closer = threading.get_ident()
        try:
            try:
                self._close_workers_and_zygote(timeout)
            except BaseException:
                # A Ctrl-C (a task's cancel) while it waited: what is left is ended at once, as by
                # close(0), then the interrupt goes on. It left the zygote, its spare and workers
                # running, and the next close() did nothing (a probe: 40 of 40).
                try:
                    self._close_workers_and_zygote(0.0)
                except BaseException:
                    self._close_cut = True  # (interrupted again: the next close() goes on)
                raise
        finally:
            self._closer = None
            self._close_done.set()

    def _zygote_closing(self) -> None:
        """The reaps of the workers' ends from here on wait less for a stuck zygote (Zygote.closing)."""
        zygote = self._zygote
        if zygote is not None:
            zygote.closing()

    def _close_workers_and_zygote(self, timeout: float) -> None:
        self._zygote_closing()
        for pool in list(self._pools):  # (those shut down already too: their queued work is cancelled)
            pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = list(self._workers.values())
        # One moment for all to obey the stop sent to each below, even close(0)'s: given to each
        # in turn, 40 workers that ignored it held a Ctrl-C'd close 2.1 s (red-team round 44).
        deadline = time.monotonic() + max(timeout, 0.05)
        for w in workers:
            if w._ended_unasked():
                continue  # ended by itself already: its stop() records how
            if w._ending is None:  # (a worker mid-call that reads the stop in a request's place ends then)
                w._ending = WorkerExit("ok", "stopped by the broker's close() during a call")
            w._stop_sent = True
            w._chan.try_send(STOP_MESSAGE)
        for w in workers:
            try:
                w._stop(max(0.0, deadline - time.monotonic()), timeout)
            except RuntimeError as exc:
                # Killed, but a call holds its handle for ever (awaited on an event loop closed
                # without cancelling the task): the rest is closed all the same, never left
                # running (an audit: the zygote and its spare were).
                log.warning("close(): %s", exc)
        self._background.wait_idle(5.0)  # (workers killed during awaited calls: reaped before their zygote ends)
        self._background.shutdown()
        zygote = self._zygote
        if zygote is not None:
            zygote.drop_check()  # (it would hold the watch's thread up to its time)
        idle_watch.settle(1.0)  # (its thread ends with the last worker's watch and timer, in any broker)
        with self._spawn_lock:  # after a zygote spawn in progress; later ones see _closed
            if self._zygote is not None:
                self._zygote.close()
            if self._opener_proc is not None:
                self._opener_proc.close()
            if self._lifeline is not None:
                self._lifeline.close()  # (its workers have ended: what they forked goes with them)
                self._lifeline = None
        self._resolver.close()

    def _lifeline_read_end(self) -> int | None:
        """For a worker forked or exec'd from here (under the spawn lock). Made
        now only in a forked copy of a broker, which let go of its parent's."""
        if self._lifeline is None:
            self._lifeline = new_lifeline()
        return None if self._lifeline is None else self._lifeline.read_end()

    # -- authority --------------------------------------------------------
    def open(self, path: str | os.PathLike[str], rights: Rights = Rights.READ) -> Capability:
        """Open a file the policy grants, as a capability to pass to a worker.
        ``path`` is relative to the broker's root (a str or a ``pathlib`` path)."""
        self._check_open()
        rights = rights_arg(rights)
        return self._resolver.open(self._resolver.locate(local_path(path), rights), rights)

    def opendir(self, path: str | os.PathLike[str], rights: Rights = Rights.LOOKUP) -> Capability:
        """Open a granted directory, as a capability to pass to a worker: at
        spawn (``grants=``) it becomes a Landlock rule; later, a proxy whose
        lookups the broker resolves."""
        self._check_open()
        rights = rights_arg(rights)
        return self._resolver.opendir(self._resolver.locate(local_path(path), rights), rights)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("broker is closed")

    def _let_go_after_fork(self) -> None:
        """In a forked child (right after the fork): the zygote, the workers
        and the pools are the parent's. Close this copy's ends of their
        channels, with no message and no signal (the processes are not ours;
        the parent's close() must see them go); their handles and pools
        refuse use. The copy goes on as the child's own broker (same policy
        and root): its first spawn starts a zygote of its own."""
        self._lock = threading.Lock()  # (another thread may have held one at the fork)
        self._spawn_lock = threading.Lock()
        self._background.forked_copy()
        self._resolver.after_fork()
        parent, self._pid = self._pid, os.getpid()
        self._closer = None  # (a close of the parent's in progress is not this copy's to wait for)
        self._close_done = threading.Event()
        if self._closed:
            self._close_done.set()
            return
        reason = _forked_reason(parent)
        for pool in self._pools:
            pool._forked_copy(reason)
        self._pools = []
        for handle in [*self._workers.values(), *self._starting]:
            handle._forked_copy(reason)
        self._workers = {}
        self._starting = weakref.WeakSet()
        if self._zygote is not None:
            self._zygote.forked_copy()
            self._zygote = None
        self._zygote_loaded = weakref.WeakSet()
        if self._opener_proc is not None:
            self._opener_proc.forked_copy()
            self._opener_proc = None
        if self._lifeline is not None:  # (held here, it would keep the parent's workers alive past the parent)
            self._lifeline.close()
            self._lifeline = None

    # -- workers ----------------------------------------------------------
    def _prepare(self, spec: SandboxSpec) -> Any:
        if self._unsandboxed:
            return None
        prepared = self._prepared.get(spec)
        if prepared is None:
            from worker.sandbox import prepare

            prepared = self._prepared[spec] = prepare(spec)
        return prepared

    def _spec_for(self, grants: list[tuple[str, Capability]]) -> SandboxSpec:
        spec = self.policy.sandbox
        if not grants:
            return spec
        slots = grant_slots([(name, cap.fileno(), cap.rights) for name, cap in grants])
        dirs = tuple(slot for slot, (_, cap) in zip(slots, grants, strict=True) if cap.kind == KIND_DIR)
        return replace(spec, fs_rules=spec.fs_rules + dirs, fd_rules=spec.fd_rules + slots)

    def _check_spawn_grants(self, grants: Mapping[str, Capability] | None) -> list[tuple[str, Capability]]:
        out = []
        if grants is not None and not isinstance(grants, Mapping):
            raise TypeError(f"grants must map names to capabilities ({{'src': broker.opendir(...)}}), "
                            f"not {type(grants).__name__}")
        for name, cap in (grants or {}).items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"grant names must be identifiers, not {name!r}")
            if not isinstance(cap, Capability) or cap.closed:
                raise TypeError(f"grant {name!r} must be an open Capability (broker.open / broker.opendir)")
            if cap.kind == KIND_DIR:
                spawn_dir_check(cap.rights, self.policy.weaker)
            elif cap.rights & (SOCKET_RIGHTS | DIR_RIGHTS):
                raise UnsupportedRights(f"grant {name!r}: {cap.rights.describe()} cannot be enforced on a file")
            out.append((name, cap))
        if len(out) > MAX_SPAWN_GRANTS:
            raise ValueError(f"at most {MAX_SPAWN_GRANTS} grants at spawn")
        return out

    def spawn(
        self, cls: type[Worker], *, timeout: float | None = None, grants: Mapping[str, Capability] | None = None
    ) -> WorkerHandle:
        """Start one sandboxed worker running ``cls``; return its handle.

        ``timeout`` is the default per-call timeout (else the broker's).
        ``grants`` are capabilities the worker holds from the start, as
        ``self.grants[name]``; their fds are pinned at sandbox entry, so every
        right in the rights table is enforced on them (directories become
        Landlock rules). Raises ``WorkerCrashed`` if ``setup()`` or sandbox
        entry fails, ``UnsupportedRights`` for a grant that cannot be enforced.
        """
        _warn_hidden(cls)
        self._warn_if_forked(cls)
        return self._spawn(cls, timeout, grants)

    def _spawn(self, cls: type[Worker], timeout: float | None, grants: Mapping[str, Capability] | None = None
               ) -> WorkerHandle:
        """spawn(), for a caller that calls the worker by method name (a pool)."""
        handle = self._start(cls, timeout, grants)
        return self._finish_spawn(handle, lambda: handle._chan.wait_readable(self.spawn_timeout))

    async def aspawn(
        self, cls: type[Worker], *, timeout: float | None = None, grants: Mapping[str, Capability] | None = None
    ) -> WorkerHandle:
        """``spawn()`` for asyncio: waits for the worker on the event loop."""
        _warn_hidden(cls)
        self._warn_if_forked(cls)
        # One spawn of this loop at a time takes the zygote's next spare, in the order they
        # came (asyncio.Lock is FIFO): without the turn, a spawn that came as a spare was made
        # took it ahead of those waiting, and under load some waited ~1 s while others passed.
        async with self._aspawn_turn():
            if self._needs_main_load(cls):
                # The zygote runs the main script's top-level code (once): not on the loop.
                for text in await _off_loop(functools.partial(self._ready_zygote_for, cls),
                                            self._background.executor()):
                    # Given here, not on the executor's thread: there its line was threading.py's.
                    warnings.warn(text, RuntimeWarning, stacklevel=user_stacklevel())
            if self._start_waits(cls, grants) or not await self._spawn_turn_from_loop():
                # Made on one of the broker's threads, which takes the spawn lock itself: held
                # across an await of this loop, it deadlocked a close() or an opener start made
                # on the loop meanwhile (red-team round 23).
                unwanted: list[WorkerHandle] = []
                try:
                    start = functools.partial(self._start, cls, timeout, grants)
                    handle = await _off_loop(start, self._background.executor(), undo=unwanted.append)
                finally:
                    for started in unwanted:  # (made for a task cancelled meanwhile)
                        self._drop_unready(started)
            else:
                try:
                    handle = self._start(cls, timeout, grants, spawn_lock_held=True)
                finally:
                    self._spawn_lock.release()
        # A worker that does not come up is ended as during an awaited call: nothing of it
        # waited for on the loop.
        handle._awaited = True
        try:
            try:
                ready = await handle._event(time.monotonic() + self.spawn_timeout) != "timeout"
                if ready and handle._chan_ended():
                    await handle._aended(_EXIT_GRACE)  # (its exit status asked for off the loop)
            except BaseException:
                self._drop_unready(handle)
                raise
            return self._finish_spawn(handle, lambda: ready)
        finally:
            handle._awaited = False

    def _drop_unready(self, handle: WorkerHandle) -> None:
        """End a worker whose aspawn() was cancelled before its handshake was
        done: killed, reaped in the background (nothing waited for on the
        loop), and never left as the zygote's worker being learned from (the
        zygote would make no next spare, and the next aspawn() waited for
        one until spawn_timeout; red-team round 23)."""
        with self._lock:
            self._starting.discard(handle)
        handle._awaited = True
        handle.kill()
        zygote = self._zygote
        if handle.spawn_method == "zygote" and zygote is not None and not self._closed:
            zygote.started(handle.pid, False)

    def _start_waits(self, cls: type[Worker], grants: Mapping[str, Capability] | None) -> bool:
        """Would ``_start`` wait: for the zygote to fork a worker on request
        (1-4 ms: one given grants, when its spare was made ahead for a start
        without them; any, when no spare is made or coming), or to be started
        again (about 90 ms) after it died; for a fresh interpreter's start-up
        (``spawn="exec"``, about 100 ms); for a fork of the broker (whose
        copy of the page tables still holds the GIL)? For ``aspawn()``, which has such a
        start made on the broker's threads (every child is started from a
        thread that lives as long as the process: see ``_parent``)."""
        method = self._auto_method(cls) if self.spawn_method == "auto" else self.spawn_method
        if method != "zygote":
            return True
        zygote = self._zygote
        return bool(grants) or zygote is None or zygote.forks_next() or not zygote.alive()

    def _auto_method(self, cls: type[Worker]) -> str:
        """What ``spawn="auto"`` starts ``cls`` with."""
        return "zygote" if importable(cls) and cls not in self._fork_only else "fork"

    async def _spawn_turn_from_loop(self) -> bool:
        """Take the spawn lock once the zygote has a spare made and nothing
        else in flight, without blocking the loop: a pool's thread holds the
        lock while it waits for its own spare (an aspawn() beside a pool that
        was starting held the loop 50-95 ms; user trial 10), and a status
        being asked for holds the zygote. Polled, a few ms apart at most.
        True: taken. False, past ``spawn_timeout``: not taken, and the spawn
        is to wait off the loop, as one that forks on request does (it went
        on with the loop blocked, which a stopped zygote held spawn_timeout
        more: the spare's own wait)."""
        deadline = time.monotonic() + self.spawn_timeout
        pause = 0.0005
        while True:
            zygote = self._zygote
            if zygote is not None:
                await zygote.spare_made(max(0.0, deadline - time.monotonic()))  # not with the loop blocked
            if self._spawn_lock.acquire(blocking=False):
                if zygote is None or zygote is not self._zygote or zygote.ready_now():
                    return True
                self._spawn_lock.release()
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.005)

    def _aspawn_turn(self) -> asyncio.Lock:
        """The running loop's lock that orders its spawns."""
        return self._aspawn_lock.get()

    def _finish_spawn(self, handle: WorkerHandle, ready: Callable[[], bool]) -> WorkerHandle:
        """Wait (``ready``) for the handshake and check it; a worker that does
        not come up is killed, never left behind."""
        ok = False
        try:
            if not ready():
                raise handle._fail("timeout", f"setup did not finish within {self.spawn_timeout:g} s")
            self._await_ready(handle)
            if self.worker_output:
                handle._chan.send({"t": "cfg", "out": True})  # before any call: its first lines are wanted
            with self._lock:  # (close() takes its list of workers under this lock, after setting _closed)
                self._starting.discard(handle)
                if not self._closed:
                    self._workers[handle.id] = handle
                    ok = True
            if not ok:
                raise RuntimeError(_CLOSED_WHILE_STARTING)
            handle._watch_exit()  # (once it is the broker's: an end recorded now forgets it)
        except BaseException as exc:
            with self._lock:
                self._starting.discard(handle)
            if handle.exit is None:
                handle.kill()
            if self._closed and isinstance(exc, Exception) and exc.args != (_CLOSED_WHILE_STARTING,):
                # (closing it ends the zygote, and this worker with it, mid-handshake: said as what it is)
                raise RuntimeError(_CLOSED_WHILE_STARTING) from exc
            raise
        finally:
            zygote = self._zygote
            if handle.spawn_method == "zygote" and zygote is not None and not self._closed:
                zygote.started(handle.pid, ok)
        return handle

    def pool(self, cls: type[Worker], size: int | None = None, **options: Any) -> WorkerPool:
        """A pool of ``size`` workers (default: CPU count) with Executor
        semantics. Options: ``timeout`` (seconds, every task), ``recycle_after``
        (calls), ``max_rss`` (bytes), ``restart`` ("always"/"never"),
        ``max_restarts``, ``grants`` (as ``spawn()`` takes them: every worker
        of the pool holds them from its start; the pool keeps copies of its
        own until it ends, so the caller may close theirs)."""
        self._check_open()
        if not (isinstance(cls, type) and issubclass(cls, Worker)):
            raise TypeError(f"pool() takes a Worker subclass, not {cls!r}")
        for name in options.keys() & _EXECUTOR_OPTIONS:
            raise TypeError(f"pool() takes no {name}= (ProcessPoolExecutor's): {_EXECUTOR_OPTIONS[name]}")
        self._warn_if_forked(cls)
        pool = WorkerPool(self, cls, (os.cpu_count() or 1) if size is None else size, **options)
        self._pools = [p for p in self._pools if not p._finished()]  # (kept until their threads end)
        self._pools.append(pool)
        return pool

    @classmethod
    async def astart(cls, *args: Any, **kwargs: Any) -> Broker:
        """``Broker(...)`` for asyncio: made on a thread of its own, so that
        starting the zygote and its first spare (about 90 ms) does not hold
        the loop, nor waits for the loop's default executor (the program's,
        which it may fill). A cancel meanwhile waits for the broker to be
        made, then closes it (on another thread) and is raised. ``async with
        await Broker.astart(policy, root=...) as broker:``."""
        thread = ThreadPoolExecutor(1, thread_name_prefix="privsep-astart")
        try:
            return await _off_loop(functools.partial(cls, *args, **kwargs), thread, undo=_close_on_a_thread)
        finally:
            thread.shutdown(wait=False)

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        # (see __exit__) Under asyncio.run() a Ctrl-C reaches the block as the main task's
        # cancel, and a task being cancelled is not to wait either: its calls' workers are killed.
        leave_now = isinstance(exc_type, type) and issubclass(exc_type, (KeyboardInterrupt, asyncio.CancelledError))
        await self.aclose(0.0 if leave_now else 2.0)

    async def aclose(self, timeout: float = 2.0) -> None:
        """``close()`` for asyncio: the workers are stopped together and their
        ends awaited on the event loop; a call another task awaits gets
        ``timeout`` to finish. (Ending the zygote, the last step, is not.)"""
        timeout = wait_timeout(timeout, "timeout", zero=True)
        if self._closed:
            await self._closed_meanwhile()
            return
        for pool in list(self._pools):  # (those shut down already too: their queued work is cancelled)
            pool.shutdown(wait=False, cancel_futures=True)
        self._zygote_closing()
        with self._lock:
            workers = list(self._workers.values())
        try:
            await asyncio.gather(*(w.astop(timeout) for w in workers), return_exceptions=True)
            # Workers still being reaped by the background thread: polled, with no thread of the loop's
            # default executor (the program's, which it may fill: aclose() waited for one to come free).
            deadline, pause = time.monotonic() + 5.0, 0.001
            while not self._background.wait_idle(0) and time.monotonic() < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.02)
        except BaseException:
            # Cancelled (a timeout around `async with`): the broker is closed all the same, its
            # workers killed, on a thread of its own (it left the broker open, spawning; an audit).
            if not self._closed:
                self._closed = True
                closer = threading.Thread(target=self._close_rest, args=(0.0,), name="privsep-close", daemon=True)
                try:
                    closer.start()
                except RuntimeError:  # (no thread to be had, at interpreter exit: closed here)
                    self._close_rest(0.0)
            raise
        if self._closed:  # (by another thread meanwhile)
            await self._closed_meanwhile()
            return
        self.close(timeout)  # the rest; a worker that would not stop is dealt with here

    async def _closed_meanwhile(self) -> None:
        """Wait on the loop, polling, for a close in progress elsewhere."""
        pause = 0.001
        while not self._wait_closed(0):
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _start(
        self,
        cls: type[Worker],
        timeout: float | None,
        grants_in: Mapping[str, Capability] | None = None,
        *,
        spawn_lock_held: bool = False,
    ) -> WorkerHandle:
        """Start a worker (the handshake is the caller's)."""
        self._check_open()
        if not (isinstance(cls, type) and issubclass(cls, Worker)):
            raise TypeError("spawn() takes a Worker subclass")
        reap_dropped()  # forked workers of brokers dropped unclosed
        # None: the broker's call_timeout; an infinite one: no limit.
        call_limit = self.call_timeout if timeout is None else checked_call_timeout(timeout, "timeout")
        grants = self._check_spawn_grants(grants_in)
        spec = self._spec_for(grants)
        method = self.spawn_method
        if method == "auto":
            method = self._auto_method(cls)
        elif method in ("zygote", "exec") and not importable(cls):
            raise TypeError(
                f"spawn={method!r} needs {cls.__qualname__} findable by name in another interpreter "
                "(not defined in a function, or in a main module that is no file)"
            )
        spec_wire = None if self._unsandboxed else _wire_of(spec)
        reaper = parent_gone = None
        limit = None if self._unsandboxed else spec.limits.memory
        cgroup: WorkerCgroup | None = None
        cgroup_report: dict[str, Any] | None = None
        placed: list[int] = []

        def place(pid: int, ready: WorkerCgroup | None = None) -> None:
            """Put the worker in its memory cgroup (taking ownership of
            ``ready``, one a spare moved itself into while it waited, else one
            made now); where the kernel refuses, go on without one and say so
            in its report (as when none can be made)."""
            nonlocal cgroup, cgroup_report
            placed.append(pid)
            if cgroup is not None:  # made for a spare that then could not serve
                cgroup.discard()
            if ready is not None:
                cgroup, cgroup_report = ready, ready.report()
                if ready.holds(pid):
                    return  # the usual case: no move (and no wait for the kernel's cgroup lock) here
            else:
                cgroup, cgroup_report = self._memory_cgroup(spec)
            if cgroup is None:
                return
            try:
                cgroup.add(pid)
            except OSError as exc:
                cgroup.discard()
                cgroup = None
                cgroup_report = {"memory": limit, "applied": False,
                                 "reason": f"cannot move the worker into its cgroup: {exc.strerror}"}

        try:
            with contextlib.nullcontext() if spawn_lock_held else self._spawn_lock:
                self._check_open()  # (close() ends the zygote holding this lock: none is started after)
                if method == "zygote":
                    method = self._zygote_method(cls)
                if method == "zygote":
                    assert self._zygote is not None
                    # a spare goes into the cgroup before it is given its request
                    pid, chan = self._zygote.spawn(cls, spec_wire, self.spawn_timeout, grants,
                                                   before=place if limit is not None else None, memory_limit=limit)
                    reaper, parent_gone = self._zygote.reap, self._zygote.gone
                elif method == "exec":
                    pid, sock, proc = exec_worker(cls, spec_wire, self.spawn_timeout, grants, self._environ,
                                                  self._lifeline_read_end())
                    chan = Channel(sock)
                    reaper = _popen_reaper(proc)
                else:
                    fork_grants = [(name, cap.fileno(), cap.kind, cap.rights) for name, cap in grants]
                    environ = None if self._environ is None else child_env(self._environ)  # as zygote workers get it
                    pid, sock = fork_worker(cls, self._prepare(spec), fork_grants, environ, self._lifeline_read_end())
                    chan = Channel(sock)
        except BaseException as exc:
            if cgroup is not None:
                cgroup.discard()
            if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
                # A process limit (EAGAIN) or no memory for a fork, a zygote, an interpreter: a
                # WorkerCrashed as when the zygote cannot fork (it was a bare BlockingIOError).
                why = f"cannot start {cls.__qualname__}: {exc}"
                raise WorkerCrashed(why, WorkerExit("crashed", why)) from exc
            raise
        try:
            handle = WorkerHandle(
                self,
                cls,
                pid,
                chan,
                timeout=call_limit,
                violation=self.policy.sandbox.violation,
                reaper=reaper,
                parent_gone=parent_gone,
            )
        except ProcessLookupError:  # gone before it could be watched (its zygote died with it)
            chan.close()
            if cgroup is not None:
                cgroup.discard()
            ex = WorkerExit("crashed", "the process was gone when the broker opened its pidfd")
            raise WorkerCrashed(f"{cls.__qualname__} ended before it could be watched", ex) from None
        except OSError as exc:  # EMFILE at its pidfd (the broker's fd limit): ended and reaped, no zombie left
            chan.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # (not reaped yet: the pid is still this worker's)
            (reaper or _waitpid)(pid)
            if cgroup is not None:
                cgroup.discard()
            why = exc.strerror or str(exc)
            ex = WorkerExit("crashed", f"the broker could not open its pidfd ({why}); it was killed")
            raise WorkerCrashed(f"{cls.__qualname__} could not be watched: {why} in the broker (its open-file "
                                "limit?); the worker was killed", ex) from exc
        handle.spawn_method = method
        # Processes of its own (the filter lets it fork): they end with it (see WorkerHandle._reap).
        handle._may_fork = self._unsandboxed or "allow-fork" in spec.dangerous
        zygote = self._zygote
        if method == "zygote" and zygote is not None and not zygote.alive():
            # The zygote's children got the parent-death signal and init may have
            # reaped this one already: the pidfd just opened may not be its own.
            # Closed unused; the worker is dead either way.
            if cgroup is not None:
                cgroup.discard()
            handle._set_exit(WorkerExit("crashed", "its zygote died while starting it"))
            assert handle.exit is not None
            raise handle.exit.error(handle.name)
        if pid not in placed:
            place(pid)  # before its first call; what setup() touched stays charged where it was
        handle._cgroup = cgroup
        handle._cgroup_report = cgroup_report
        handle._cpu_limited = not self._unsandboxed and spec.limits.cpu_seconds is not None
        handle._spawn_grants = tuple((name, cap.name, cap.rights) for name, cap in grants)
        with self._lock:
            self._starting.add(handle)  # (one of the broker's workers once its handshake is done: _finish_spawn)
        return handle

    def _needs_main_load(self, cls: type[Worker]) -> bool:
        """Would a spawn of ``cls`` first have the zygote import the main script?"""
        return (
            self.spawn_method in ("auto", "zygote")
            and cls not in self._zygote_loaded
            and cls not in self._fork_only
            and is_main_ref(module_ref(cls) or "")
        )

    def _warn_if_forked(self, cls: type[Worker]) -> None:
        """Where ``spawn="auto"`` will fork ``cls`` from the broker because no
        other interpreter can find it, say so once per class (from spawn,
        aspawn or pool: the warning points at their caller), as for a main
        script the zygote cannot load: a forked worker holds a copy of the
        broker's memory, which the default spawn never gives a worker."""
        if not (isinstance(cls, type) and issubclass(cls, Worker)):
            return  # (refused where it is spawned)
        if self.spawn_method != "auto" or cls in self._fork_only or importable(cls):
            return
        self._fork_only.add(cls)
        warnings.warn(
            f"{cls.__qualname__} cannot be found by name in another interpreter (a class defined in a "
            "function, or in a main module that is no file), so its workers are forked from the broker and "
            "hold a copy of its memory; define it at module level, or pass spawn='fork' to say so",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def _ready_zygote_for(self, cls: type[Worker]) -> list[str]:
        """Have the zygote ready for ``cls`` (on a thread of aspawn's): the
        warnings to give, for the caller to give them on its own thread."""
        warn_later: list[str] = []
        with self._spawn_lock:
            self._zygote_method(cls, warn_later)
        return warn_later

    def _zygote_method(self, cls: type[Worker], warn_later: list[str] | None = None) -> str:
        """A running zygote that has ``cls`` (starting one if needed): "zygote";
        or "fork" where ``spawn="auto"`` gives up on the zygote for this class.
        Holds the spawn lock."""
        if self._zygote is not None and not self._zygote.alive():
            log.warning("the zygote has exited (%s); starting a new one", self._zygote.exit_reason())
            self._zygote.close()
            self._zygote = None
        if self._zygote is None:
            self._zygote = Zygote(self._spare_cgroup, self._environ)
            self._zygote_loaded.clear()
        if cls in self._fork_only:
            return "fork"
        if cls not in self._zygote_loaded and is_main_ref(module_ref(cls) or ""):
            return self._load_main(cls, warn_later)
        return "zygote"

    def _load_main(self, cls: type[Worker], warn_later: list[str] | None = None) -> str:
        """Before a class from the main script is first spawned by this zygote,
        have the zygote import the script (its top-level code runs there, as in
        a multiprocessing child). Where it cannot, ``spawn="auto"`` forks
        such workers from the broker instead, and says why, once; an explicit
        ``spawn="zygote"`` fails. Returns the method to use. Holds the spawn lock."""
        assert self._zygote is not None
        try:
            self._zygote.load(cls, self.spawn_timeout)
        except CannotImport as exc:  # (a zygote that died raises WorkerCrashed: the next spawn starts anew)
            if self.spawn_method != "auto":
                raise WorkerCrashed(str(exc)) from exc.__cause__
            # A warning, not a log line: the script itself should change, and the
            # library's loggers stay silent unless the application sets them up.
            text = f"{cls.__qualname__}: {exc}; its workers are forked from the broker instead"
            if warn_later is not None:
                warn_later.append(text)
            else:
                warnings.warn(text, RuntimeWarning, stacklevel=user_stacklevel())
            self._fork_only.add(cls)
            return "fork"
        self._zygote_loaded.add(cls)
        return "zygote"

    def _setup_failure(self, cause: BaseException) -> WorkerExit:
        """How a worker that could not start ended, naming the limit that
        stopped it when one did (a worker's own fds and the interpreter's
        memory come under the policy's rlimits at entry)."""
        limits = self.policy.limits
        if isinstance(cause, RemoteError):  # (its text names the worker's class already)
            text = str(cause)
        else:
            text = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        if isinstance(cause, MemoryError):
            hint = "" if limits.address_space is None else (
                f"; Limits.address_space ({_size(limits.address_space)}) is too small for this worker"
            )
            return WorkerExit("oom", f"{SETUP_FAILED} ran out of memory ({text}){hint}")
        emfile = getattr(cause, "errno", None) == errno.EMFILE or os.strerror(errno.EMFILE) in str(cause)
        if emfile and limits.open_files is not None:  # (a SandboxError carries the errno's text only)
            return WorkerExit("crashed", f"{SETUP_FAILED} failed: {text}; Limits.open_files "
                                         f"({limits.open_files}) leaves the worker no fd to make")
        if isinstance(cause, TypeError) and "__init__() missing" in str(cause):
            text += " (a worker is made with no arguments: give it settings as class attributes or in a call)"
        return WorkerExit("crashed", f"{SETUP_FAILED} failed: {text}")

    def _await_ready(self, handle: WorkerHandle) -> None:
        """Read and check the worker's handshake (the channel is readable)."""
        chan = handle._chan
        try:
            msg = chan.recv()
        except ProtocolError as exc:
            raise handle._fail("protocol", str(exc)) from exc
        except OSError as exc:  # ECONNRESET: it died with our spawn request unread
            raise handle._fail_from_os(exc) from exc
        if msg is None:
            raise handle._died(grace=handle._handshake_grace())
        try:
            check_message(msg, frozenset({"ready", "fail"}))
        except ProtocolError as exc:
            close_fds_in(msg)
            raise handle._fail("protocol", str(exc)) from exc
        if msg["t"] == "fail":
            cause = exception_from_wire(msg["e"])
            handle._reap(1.0)
            handle._set_exit(self._setup_failure(cause))
            assert handle.exit is not None
            raise WorkerCrashed(f"worker {handle.name}: {handle.exit.reason}", handle.exit) from cause
        notify = msg["notify"]
        if msg["v"] != PROTOCOL_VERSION or msg["pid"] != handle.pid:
            close_fds_in(msg)
            raise handle._fail("protocol", f"bad handshake (version {msg['v']}, pid {msg['pid']})")
        if notify is not None:
            if not isinstance(notify, ReceivedFd) or not _is_seccomp_listener(notify.fd):
                close_fds_in(msg)
                raise handle._fail("protocol", "handshake carried something other than a seccomp listener")
            handle._adopt_notify(notify.detach())
        elif not self._unsandboxed and self.policy.sandbox.seccomp and _expects_listener(msg["sandbox"]):
            raise handle._fail("protocol", "sandbox reported user notification but sent no listener")
        err = msg["err"]
        if err is not None:
            if not isinstance(err, ReceivedFd) or not _is_pipe(err.fd):
                close_fds_in(msg)
                raise handle._fail("protocol", "handshake carried something other than a pipe for stderr")
            if self.worker_output:  # (else the worker makes its stderr /dev/null at its first call)
                handle._stderr_fd = err.detach()
            else:
                err.close()
        close_fds_in(msg["sandbox"])
        handle.sandbox = msg["sandbox"]
        if handle._cgroup_report is not None:
            handle.sandbox["cgroup"] = handle._cgroup_report
        self.last_sandbox = handle.sandbox
        self._audit(handle, "spawn", handle.cls.__qualname__, None, "granted", "worker ready")
        for name, path, rights in handle._spawn_grants:
            self._audit(handle, "grant", path, rights, "granted", f"held from spawn as grants[{name!r}]")

    def _forget(self, handle: WorkerHandle) -> None:
        with self._lock:
            self._workers.pop(handle.id, None)

    @property
    def cgroups(self) -> CgroupSupport:
        """Where this broker can make per-worker memory cgroups (for
        ``Limits.memory``): version 2 or 1 and the parent, or version 0 and why
        not. Probed once. ``Broker(cgroup_parent=...)`` names a delegated
        cgroup v2 directory to use instead of the broker's own cgroup."""
        if self._cgroups is None:
            self._cgroups = cgroup_probe(self._cgroup_parent)
        return self._cgroups

    def _memory_cgroup(self, spec: SandboxSpec) -> tuple[WorkerCgroup | None, dict[str, Any] | None]:
        """A cgroup for a worker under ``spec``'s memory limit, and what to report."""
        limit = spec.limits.memory
        if limit is None or self._unsandboxed:
            return None, None
        support = self.cgroups
        if not support.version:
            return None, {"memory": limit, "applied": False, "reason": support.reason}
        try:
            cg = WorkerCgroup.create(support, limit)
        except OSError as exc:
            return None, {"memory": limit, "applied": False, "reason": f"cannot make a cgroup: {exc.strerror}"}
        return cg, cg.report()

    def _spare_cgroup(self) -> WorkerCgroup | None:
        """A memory cgroup for the zygote's next spare to move into while it
        waits (so no spawn waits for that move); None where workers get none."""
        if self._closed:
            return None
        return self._memory_cgroup(self.policy.sandbox)[0]

    @property
    def policy(self) -> Policy:
        """The policy this broker enforces, fixed for its lifetime."""
        return self._policy

    @property
    def workers(self) -> list[WorkerHandle]:
        """The workers running: not one whose end is recorded, though the
        thread that recorded it has not let it go yet (a reader who saw
        ``handle.exit`` set then found the handle still listed here)."""
        with self._lock:
            return [h for h in self._workers.values() if h.exit is None]

    # -- requests from workers --------------------------------------------
    def _serve_request(
        self, handle: WorkerHandle, op: str, args: dict[str, Any], outputs: list[PendingOutput], after: list[Any],
        over_quota: bool = False,
    ) -> Any:
        """Answer one request. Returns the reply value; ``after`` collects
        what to release once it is sent. ``over_quota``: past the call's
        ``max_requests_per_call``, refused (and audited, as any refusal)."""
        if op == "dclose" and not over_quota:  # the worker is done with a directory proxy it asked for
            handle._release_dir(args["dir"])
            return None
        rights: Rights | None = None
        target: Target | None = None
        try:
            if over_quota:
                raise NotCapable(f"more than {self.max_requests_per_call} requests in one call")
            if "rights" in args:
                try:
                    rights = rights_from_wire(args["rights"])
                except ProtocolError as exc:
                    raise NotCapable(str(exc)) from None
            target = self._locate_request(handle, op, args, rights)
            value = self._dispatch(handle, op, args, rights, target, outputs, after)
        except NotCapable as exc:
            self._audit(handle, op, _audited(handle, op, args, target), rights, "denied", exc.strerror or str(exc))
            raise
        except OSError as exc:
            self._audit(handle, op, _audited(handle, op, args, target), rights, "failed", exc.strerror or str(exc))
            raise
        if value is _EXISTED:
            self._audit(handle, op, target.display, rights, "granted", "the directory exists already (exist_ok)")
            return None
        self._audit(handle, op, target.display, rights, "granted", "")
        return value

    def _locate_request(self, handle: WorkerHandle, op: str, args: dict[str, Any], rights: Rights | None) -> Target:
        """Where a request's path leads, checked against the policy (or the
        directory proxy it names) for the rights it needs."""
        r = self._resolver
        path = args["path"]
        if op.startswith("d"):  # beneath a directory proxy
            directory = handle._dirs.get(args["dir"])
            if directory is None:
                raise NotCapable("no such directory grant", filename=str(path))
            op = op[1:]
            need = {
                "open": rights,
                "create": rights,
                "stat": Rights.FSTAT,
                "list": Rights.READ,
                "unlink": Rights.UNLINKAT,
                "mkdir": Rights.MKDIRAT,
            }
            wanted = need[op] or Rights.NONE
            if op == "create":
                wanted = wanted | Rights.WRITE | Rights.CREATE
            return r.locate_in(directory, path, wanted)
        wanted = {"stat": Rights.FSTAT, "listdir": Rights.READ, "mkdir": Rights.MKDIRAT}.get(op, rights or Rights.NONE)
        if op == "create":
            wanted = wanted | Rights.WRITE | Rights.CREATE
        return r.locate(path, wanted)

    def _dispatch(
        self,
        handle: WorkerHandle,
        op: str,
        args: dict[str, Any],
        rights: Rights | None,
        target: Target,
        outputs: list[PendingOutput],
        after: list[Any],
    ) -> Any:
        r = self._resolver
        path = args["path"]
        if op.startswith("d"):
            op = op[1:]
        if handle._outputs_allowed is not None and (
            op in ("unlink", "mkdir") or (op == "open" and rights is not None and rights & _WRITES)
        ):  # the caller named this call's outputs: they are all it may write
            raise NotCapable("this call may write nothing but the outputs its caller named", filename=target.display)
        if op == "open":
            assert rights is not None
            cap = r.open(target, rights)
            after.append(cap)
            return self._deliver(handle, cap, after, request=True)
        if op == "create":
            assert rights is not None
            if len(outputs) >= self.max_outputs_per_call:
                raise NotCapable(f"more than {self.max_outputs_per_call} outputs in one call")
            named = handle._outputs_allowed
            if named is not None and target.display not in named:  # the caller named them (with_outputs)
                shown = ", ".join(sorted(named)) or "none"
                raise NotCapable(f"this call may create only the outputs its caller named ({shown})",
                                 filename=target.display)
            if any(out.display == target.display for out in outputs):  # (the last would win, silently)
                raise NotCapable("this call has created that output already", filename=target.display)
            live = len(self._workers)
            self._fds.take(handle, 2, "an output", live)  # its directory and its file, until the call ends
            try:
                pending, cap = r.create(target, rights | Rights.WRITE)
            except BaseException:
                self._fds.give_back(handle, 2)
                raise
            after.append(cap)
            try:
                value = self._deliver(handle, cap, after, pending, request=True)
            except BaseException:
                # Refused (rights Linux cannot hold to after entry, the fd share spent on its
                # pipe): no output. Kept among the call's outputs, it was committed at the call's
                # end, an empty file in place of the one it named (red-team round 37).
                pending.discard()
                self._fds.give_back(handle, 2)
                raise
            handle._held_call += 2
            outputs.append(pending)
            return value
        if op == "opendir":
            assert rights is not None
            self._fds.take(handle, 1, "a directory", len(self._workers))
            try:
                return handle._register_dir(r.opendir(target, rights), held=True)
            except BaseException:
                self._fds.give_back(handle, 1)
                raise
        if op == "stat":
            return r.stat(target)
        if op in ("listdir", "list"):
            return self._list(handle, (args.get("dir", -1), path), target, args["at"])
        if op == "unlink":
            r.unlink(target)
            return None
        if op == "mkdir":
            try:
                r.mkdir(target)
            except FileExistsError:
                if not args["exist_ok"] or not self._existing_dir(handle, args):
                    raise
                return _EXISTED
            return None
        raise NotCapable(f"unknown request {op!r}")

    def _existing_dir(self, handle: WorkerHandle, args: dict[str, Any]) -> bool:
        """mkdir(exist_ok=True) found something at its path: is it a directory,
        seen as the worker's own ``stat`` request would see it (which takes
        FSTAT: without it, what exists stays FileExistsError, as before)?"""
        try:
            target = self._locate_request(handle, "dstat" if "dir" in args else "stat", args, None)
            return bool(self._resolver.stat(target)["type"] == "dir")
        except OSError:  # (NotCapable too)
            return False

    def _list(self, handle: WorkerHandle, key: tuple[int, str], target: Any, at: int) -> dict[str, Any]:
        """One page of a listing. The first (``at`` 0) lists the directory; the
        broker keeps the names for the next pages until the last is sent or
        the call ends, at most MAX_LISTINGS of them per worker (a page whose
        listing was let go lists it again)."""
        listings = handle._listings
        names = listings.get(key) if at else None
        if names is None:
            names = self._resolver.listdir(target, handle._charge_entries)
            listings.pop(key, None)
            while len(listings) >= MAX_LISTINGS:
                del listings[next(iter(listings))]
            listings[key] = names
        if not 0 <= at <= len(names):
            raise NotCapable(f"no page at {at} in a listing of {len(names)} names", filename=target.display)
        page, after = _page(names, at)
        if not after:
            listings.pop(key, None)
        return {"names": page, "next": after}

    def sandbox_report(self) -> dict[str, Any]:
        """What the last worker to start reported about its sandbox (layers
        applied, Landlock ABI, seccomp mode, limits); ``{}`` before any."""
        return dict(self.last_sandbox)

    # -- delivering grants after entry ------------------------------------
    def landlock_abi(self) -> int:
        if self._abi is None:
            from worker.sandbox import probe

            self._abi = int(probe().get("landlock_abi", 0))
        return self._abi

    def _starts_opener(self, rights: int) -> bool:
        """Would a file with ``rights``, delivered after sandbox entry, start
        the restricted opener now (about 90 ms: an awaited call has it done
        off the loop)?"""
        opener = self._opener_proc
        if opener is not None and opener.alive():
            return False
        if self._abi is None:
            return True  # (not known yet: the probe takes about 8 ms, off the loop too)
        try:
            return _plan(rights, self._abi, self._weaker)[0] == NO_TRUNCATE
        except UnsupportedRights:
            return False  # (refused when it is served)

    def _request_starts_opener(self, msg: dict[str, Any]) -> bool:
        """``_starts_opener`` for a worker's request (checked as a request already)."""
        op, args = msg["op"], msg["a"]
        if op not in _OPENS or type(args) is not dict:
            return False
        try:
            rights = int(rights_from_wire(args.get("rights")))
        except ProtocolError:
            return False  # (refused when it is served)
        return self._starts_opener(rights | int(Rights.WRITE) if op.endswith("create") else rights)

    def _opener(self) -> Opener:
        opener = self._opener_proc
        if opener is not None and opener.alive():
            return opener  # (not behind the spawn lock, which a start on another thread may hold a while)
        with self._spawn_lock:
            if self._opener_proc is not None and not self._opener_proc.alive():
                log.warning("the restricted opener has exited; starting a new one")
                self._opener_proc.close()
                self._opener_proc = None
            if self._opener_proc is None:
                self._opener_proc = Opener(self._environ)
            return self._opener_proc

    def _deliver(
        self,
        handle: WorkerHandle,
        cap: Capability,
        after: list[Any],
        pending: PendingOutput | None = None,
        *,
        request: bool = False,
    ) -> Any:
        """What travels to a worker for ``cap`` after its sandbox entry."""
        if cap.kind != KIND_FILE:
            if cap.kind == KIND_DIR:  # (a call's argument: only _export sends a directory this way)
                return handle._register_dir(cap, copy=True, for_call=True)
            return cap  # a stream the broker got from a worker: sent as is
        plan, rights = _plan(int(cap.rights), self.landlock_abi(), self._weaker)
        if plan == PLAIN:  # the common case: the fd itself travels, with rights Landlock enforces
            out = Outgoing(cap.fileno(), KIND_FILE, rights, False)
            after.append(out)
            return out
        # A pipe holds two broker fds while a pump thread or the call's loop moves its
        # data: counted against the worker's share (see _budget), for a file it asked for
        # and for one passed to it alike (a worker that keeps the pipe unread keeps both).
        piped = plan in (PIPE_READ, PIPE_WRITE)
        if piped:
            what = "a file delivered as a pipe" if request else "a file argument delivered as a pipe"
            self._fds.take(handle, 2, what, len(self._workers))
        fds = self._fds
        try:
            out, mover = deliver(
                cap,
                plan,
                rights,
                self._opener,
                _flags(int(rights)),
                self.policy.limits.file_size,
                drain=pending is not None,
                on_end=(lambda: fds.give_back(handle, 2)) if piped and pending is None else None,
            )
        except BaseException:
            if piped:
                fds.give_back(handle, 2)
            raise
        after.append(out)
        if isinstance(mover, Drain):  # an output: drained by the call's own loop
            assert pending is not None
            pending.drain = mover
            handle._drains[mover.src] = mover
            if piped:
                handle._held_call += 2  # given back when the call ends
        elif mover is None and piped:
            fds.give_back(handle, 2)  # it all fit in the pipe at once
        # A Pump is a daemon thread that ends when the file or the pipe does (and gives its fds back).
        return out

    def _export(self, handle: WorkerHandle, obj: Any, after: list[Any], depth: int = 2) -> Any:
        """A call argument (``depth``: where it sits in the call message) with
        every capability turned into what travels. What the worker's wire
        check would refuse is refused here, with the reason: it would end the
        worker."""
        t = type(obj)
        if t in SCALAR_TYPES:
            if (
                (t is int and not INT_MIN <= obj <= INT_MAX)
                or depth > MAX_DEPTH
                or ((t is bytes or t is str) and len(obj) > CHECK_BLOB_LEN)
            ):
                check_sendable(obj, depth)  # raises, saying why
            return obj
        if isinstance(obj, Capability):
            out = self._deliver(handle, obj, after)
            self._audit(handle, "pass", obj.name, obj.rights, "granted", f"an argument of {handle._call_what[0]}()")
            return out
        if isinstance(obj, list | tuple | dict):
            if check_plain(obj, depth):
                # Nothing to turn into what travels. A copy (in C) is sent, never the caller's own
                # list: one changed before the packing (another thread, another task while a long
                # list is sent from a broker thread) sent unchecked what was added, a capability
                # as its raw fd (red-team round 24).
                return obj.copy() if isinstance(obj, list | dict) else obj  # (a tuple of scalars cannot change)
            if depth >= MAX_DEPTH:
                check_sendable(obj, depth)
        if isinstance(obj, list | tuple):
            return [self._export(handle, x, after, depth + 1) for x in obj]
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if type(k) is not str:
                    raise TypeError(f"map keys must be str, not {type(k).__name__}")
                out[k] = self._export(handle, v, after, depth + 1)
            return out
        if isinstance(obj, int | bytearray | memoryview | bytes | str):  # IntEnum, a buffer, a str subclass...
            check_sendable(obj, depth)
        return obj

    def _audit(
        self, handle: WorkerHandle, op: str, path: Any, rights: Rights | None, decision: str, reason: str
    ) -> None:
        if not audit_log.isEnabledFor(logging.INFO):
            return
        shown = bounded(path if isinstance(path, str) else short_repr(path))
        reason = bounded(reason)
        event = {
            "worker": handle.id,
            "pid": handle.pid,
            "request": op,
            "path": shown,
            "rights": rights.describe() if rights is not None else None,
            "decision": decision,
            "reason": reason,
        }
        # makeRecord + handle: the same record and handlers as .info(), without
        # logging walking the stack to find the caller (a few us per event).
        audit_log.handle(
            audit_log.makeRecord(
                audit_log.name,
                logging.INFO,
                __file__,
                0,
                "%s %s %s %s%s",
                # The path quoted (a Python literal: escaped, and its quotes too), so that no path
                # reads as more fields: "secret granted (ok)" denied read as granted (red-team round 38).
                (handle.name, op, repr(shown), decision, f" ({printable(reason)})" if reason else ""),
                None,
                extra={"privsep": event},
            )
        )


def _audited(handle: WorkerHandle, op: str, args: dict[str, Any], target: Target | None) -> Any:
    """The path an audit event names: from the broker's root, as it was
    located, so that one file reads the same however a worker spells it
    (``ad//secret/./x.txt``) or through whichever proxy; a path refused
    before it was located, the same way where it can be read as one."""
    if target is not None:
        return target.display
    path = args.get("path")
    if type(path) is not str:
        return path
    try:
        shown = "/".join(split_relative(path))
    except NotCapable:
        shown = path
    if op[0] == "d":  # beneath a directory proxy: else two proxies' x.txt read alike
        directory = handle._dirs.get(args["dir"])
        if directory is not None and directory.name:
            shown = f"{directory.name}/{shown}" if shown else directory.name
    return shown


_OPENS = frozenset({"open", "create", "dopen", "dcreate"})  # the requests that may deliver a file


@functools.lru_cache(maxsize=256)
def _plan(rights: int, abi: int, weaker: int) -> tuple[str, Rights]:
    # Enum arithmetic is slow; a plan depends only on these three ints.
    return later_file_plan(Rights(rights), landlock_abi=abi, accept_weaker=Rights(weaker))


@functools.lru_cache(maxsize=256)
def _flags(rights: int) -> int:
    return access_flags(Rights(rights)) | _OPEN_BASE


def _popen_reaper(proc: subprocess.Popen[bytes]) -> Any:
    def reap(pid: int) -> int | None:
        try:
            status = os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        return status

    return reap


def _is_seccomp_listener(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
    except OSError:
        return False


def _expects_listener(report: Any) -> bool:
    return isinstance(report, dict) and report.get("seccomp") == "notify"


@functools.lru_cache(maxsize=64)
def _wire_of(spec: SandboxSpec) -> dict[str, Any]:
    """The spec as it travels (built once per spec; treat as read-only)."""
    return spec.to_wire()


__all__ = ["UNSANDBOXED", "Broker"]
