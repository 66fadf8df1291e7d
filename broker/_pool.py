"""A pool of sandboxed workers with ``concurrent.futures.Executor`` semantics.

Drop it in where ``ProcessPoolExecutor`` was: ``submit``, ``map``,
``shutdown`` (with ``cancel_futures``), the context manager. Pass the
unbound ``@rpc`` method (``pool.submit(Thumbnailer.thumbnail, cap, 128)``)
or its name. Each slot owns one worker and one thread that feeds it; a worker
that dies is replaced (restart policy), and workers can be recycled after N
calls or when their memory grows past a bound.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future, InvalidStateError
from typing import TYPE_CHECKING, Any, cast

from protocol import PrivsepError, WorkerCrashed
from protocol._wire import KIND_DIR, KIND_FILE
from worker import Worker
from worker._rpc import is_rpc

from ._capability import Capability
from ._exit import SETUP_FAILED, WorkerExit
from ._handle import WorkerHandle, output_paths
from ._logtext import printable
from ._options import call_timeout, count, optional_count

if TYPE_CHECKING:
    from ._broker import Broker

# (future, method, args, kwargs, the outputs it may write or None, its timeout or _POOLS)
_Task = tuple[Future[Any], str, tuple[Any, ...], dict[str, Any], "frozenset[str] | None", object]
_POOLS = object()  # a task's timeout: the pool's own


log = logging.getLogger("privsep.pool")


class PoolBroken(PrivsepError, BrokenExecutor):
    """The pool stopped replacing workers (restart policy exhausted). Also a
    ``concurrent.futures.BrokenExecutor``, as ``BrokenProcessPool`` is, so
    code written for ``ProcessPoolExecutor`` catches it as it was."""


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, from /proc; None if it cannot be read.

    Read through a live thread when the leader's reads 0: a worker whose main
    thread ended by itself (``SYS_exit``, another thread serving on) has a
    zombie leader with no memory of its own to show, and grew to 620 MiB under
    a 100 MiB ``max_rss`` that read 0 (red-team round 16)."""
    try:
        rss = _statm_rss(f"/proc/{pid}/statm")
        if rss:
            return rss
        for tid in os.listdir(f"/proc/{pid}/task"):  # (threads share one memory: the first that shows it)
            rss = _statm_rss(f"/proc/{pid}/task/{tid}/statm")
            if rss:
                return rss
        return None
    except (OSError, ValueError, IndexError):
        return None


def _statm_rss(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[1]) * 4096
    except FileNotFoundError:  # (a thread that ended meanwhile)
        return 0


class WorkerPool(Executor):
    """``size`` sandboxed workers of one class behind an Executor.

    ``exits`` holds how the last ``EXITS_KEPT`` workers it retired ended
    (oldest first; a long-lived pool of hostile input retires many, and
    must not keep them all); ``ended`` counts them all, one whose
    ``setup()`` failed included. ``restarts`` counts the workers started to
    replace a crashed one, when its slot's next task comes (a recycled
    worker's successor is no restart).
    """

    EXITS_KEPT = 1000

    def __init__(
        self,
        broker: Broker,
        cls: type[Worker],
        size: int,
        *,
        timeout: float | None = None,
        recycle_after: int | None = None,
        max_rss: int | None = None,
        restart: str = "always",
        max_restarts: int | None = None,
        grants: Mapping[str, Capability] | None = None,
    ):
        size = count(size, "pool size")
        recycle_after = optional_count(recycle_after, "recycle_after")
        max_rss = optional_count(max_rss, "max_rss")
        max_restarts = optional_count(max_restarts, "max_restarts", zero=True)
        if restart not in ("always", "never"):
            raise ValueError("restart must be 'always' or 'never'")
        # Each worker's spawn-time grants are opened anew from the pool's own copies (dups, so that
        # the caller may close theirs; let go when the last slot's thread ends).
        checked = broker._check_spawn_grants(grants)
        self._grants: dict[str, Capability] | None = {name: copy.copy(cap) for name, cap in checked} or None
        self._broker = broker
        self.cls = cls
        self.size = size
        # Per call; None: the broker's call_timeout (an infinite one: no limit).
        self.timeout = broker.call_timeout if timeout is None else call_timeout(timeout, "timeout")
        self.recycle_after = recycle_after
        self.max_rss = max_rss
        self.restart = restart
        self.max_restarts = max_restarts
        self.restarts = 0
        self.exits: deque[WorkerExit] = deque(maxlen=self.EXITS_KEPT)
        self.ended = 0
        # (future, method, args, kwargs, the outputs it may write or None); None: the slot ends
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: dict[Future[Any], WorkerHandle] = {}  # task -> the worker running it (see .aio)
        self._pending = 0  # tasks submitted and not done
        self._count_lock = threading.Lock()
        self._abandoned: set[Future[Any]] = set()  # cancelled as it started, before it was in _running
        self._handles: list[WorkerHandle | None] = [None] * size
        self._crashed = [False] * size
        self._shutdown = False
        self._given_up = False  # left by Ctrl-C or a cancel: no task starts any more (see _give_up)
        self._closed: Future[None] | None = None  # (aclose's wait for the slots' threads)
        self._broken: str | None = None
        self._slots_left = size  # slots whose thread has not ended (the last lets the grants go)
        self._threads = [
            threading.Thread(target=self._slot, args=(i,), name=f"privsep-pool-{cls.__name__}-{i}", daemon=True)
            for i in range(size)
        ]
        for t in self._threads:
            t.start()

    # -- Executor ---------------------------------------------------------
    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(fn, args, kwargs, None, _POOLS)

    def with_outputs(self, *paths: str | os.PathLike[str]) -> PoolView:
        """A view whose tasks run under ``handle.with_outputs(*paths)``: those
        outputs are all a task may write
        (``pool.with_outputs("out/a.jpg").submit(Cls.convert, ...)``)."""
        return PoolView(self, output_paths(paths), _POOLS)

    def with_timeout(self, seconds: float | None) -> PoolView:
        """A view whose tasks time out after ``seconds`` (positive; None or
        infinity: no limit) instead of the pool's ``timeout``:
        ``pool.with_timeout(5).map(Cls.parse, caps)``."""
        return PoolView(self, None, call_timeout(seconds, "timeout"))

    @property
    def aio(self) -> AsyncPool:
        """The pool's tasks awaited on an event loop: ``await
        pool.aio.submit(Cls.method, ...)`` is the task's result."""
        return AsyncPool(self, None, _POOLS)

    def _cancel(self, fut: Future[Any]) -> None:
        """An awaited task's caller stopped waiting: not started, it never
        will; running, its worker is killed (its end: ``cancelled``), as an
        awaited call's is, and replaced (a restart, as for any worker it
        replaces). Under the lock the slot takes the task off ``_running``
        with: a cancel never reaches the worker of a later task."""
        if fut.cancel():
            return
        with self._lock:
            handle = self._running.get(fut)
            if handle is None:
                if not fut.done():
                    self._abandoned.add(fut)  # (its slot sees it before the call, or lets it go after)
                return
            if handle.exit is None:
                if handle._ending is None:
                    handle._ending = WorkerExit("cancelled", "its caller stopped waiting for the task (cancelled)")
                handle._kill()

    def _submit(
        self, fn: Callable[..., Any] | str, args: tuple[Any, ...], kwargs: dict[str, Any],
        outputs: frozenset[str] | None, timeout: object,
    ) -> Future[Any]:
        method = self._method_name(fn)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool that was shut down")
            if self._broken:
                raise PoolBroken(self._broken)
            fut: Future[Any] = Future()
            with self._count_lock:
                self._pending += 1
            self._queue.put((fut, method, args, kwargs, outputs, timeout))
        fut.add_done_callback(self._task_done)
        return fut

    def _task_done(self, fut: Future[Any]) -> None:
        with self._count_lock:  # (its own: a future may end under the pool's lock)
            self._pending -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``Executor.shutdown``: no more submits; the queued work runs
        unless ``cancel_futures`` (which a later call may still ask for, as the
        broker's ``close()`` does). The broker keeps the pool until its
        threads end, so that what is queued still runs at interpreter exit."""
        with self._lock:
            queued = self._take_queued() if cancel_futures else []
            if not self._shutdown:
                self._shutdown = True
                for _ in self._threads:
                    self._queue.put(None)
        for fut in queued:  # (not under the lock: its done-callbacks run here, and may submit)
            fut.cancel()
        if wait:
            self._join()

    async def aclose(self, *, cancel_futures: bool = False) -> None:
        """``shutdown()`` for asyncio: no more submits, and the queued work
        (unless ``cancel_futures``) and the running tasks end, awaited on the
        loop, which is never blocked for them (``shutdown(wait=True)`` held
        it). Cancelled, it raises at once and the shutdown goes on. One
        thread waits for the pool's, however many ``aclose()`` there are
        (each cancelled one left a thread until the tasks ended; red-team
        round 35)."""
        self.shutdown(wait=False, cancel_futures=cancel_futures)
        if not self._finished():
            await asyncio.wrap_future(self._closing())

    def _closing(self) -> Future[None]:
        """Done when every slot's thread has ended; never cancelled (a
        cancelled await of it leaves it to the others)."""
        with self._lock:
            if self._closed is None:
                closed = self._closed = Future()
                closed.set_running_or_notify_cancel()

                def join() -> None:
                    self._join()
                    closed.set_result(None)

                threading.Thread(target=join, name=f"privsep-pool-close-{self.cls.__name__}", daemon=True).start()
            return self._closed

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """``shutdown()``, as an Executor's; left by Ctrl-C, see ``_give_up``."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._give_up()
        self.shutdown(wait=True)

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """``aclose()``; left by a cancel or Ctrl-C, see ``_give_up``."""
        if exc_type is not None and issubclass(exc_type, (asyncio.CancelledError, KeyboardInterrupt)):
            self._give_up()
        await self.aclose()

    def _give_up(self) -> None:
        """Left by Ctrl-C (or, awaited, a cancel): the user wants out now. The
        queued tasks are cancelled and the workers running tasks stopped at
        once (their tasks raise WorkerCrashed), as leaving ``with Broker`` so
        does: a Ctrl-C at the terminal never reaches them (each leads its own
        process group), and the block waited for every task still queued (5.3
        s after a Ctrl-C in a user trial)."""
        with self._lock:
            # (a task its slot took but has not started yet, its worker being made, is not started)
            self._given_up = True
        self.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = list(self._running.values())
        for handle in running:
            try:
                handle.stop(0.0)
            except RuntimeError as exc:  # (its call did not end after the kill: logged, the rest go on)
                log.warning("pool %s: %s", self.cls.__name__, printable(str(exc)))

    def _join(self) -> None:
        for t in self._threads:
            t.join()

    def _finished(self) -> bool:
        """Shut down, and every slot's thread has ended."""
        return self._shutdown and not any(t.is_alive() for t in self._threads)

    # -- introspection ----------------------------------------------------
    @property
    def workers(self) -> list[WorkerHandle]:
        """The workers whose process runs. Each slot starts its first as the
        pool is made, on its own thread (``broker.pool()`` returns before
        they are up), and a replacement when its next task comes."""
        return [h for h in self._handles if h is not None and h.alive]

    @property
    def broken(self) -> str | None:
        """Why the pool is broken (every submit raises ``PoolBroken``), or None."""
        return self._broken

    @property
    def pending(self) -> int:
        """Tasks submitted and not done: queued, or running on a worker."""
        return self._pending

    @property
    def running(self) -> int:
        """Tasks running on a worker now."""
        return len(self._running)

    # -- internals --------------------------------------------------------
    def _forked_copy(self, reason: str) -> None:
        """In a forked child: its threads did not come along; refuse work."""
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._broken = f"not this process's pool: {reason}, and its threads did not come along (make a pool here)"
        self._handles = [None] * self.size

    def _method_name(self, fn: Callable[..., Any] | str) -> str:
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", None)
        if not isinstance(name, str) or name not in self.cls.rpc_methods:
            raise TypeError(f"{fn!r} is not an @rpc method of {self.cls.__name__}")
        # (== : a classmethod is a new bound method at each attribute access)
        if not isinstance(fn, str) and not (is_rpc(fn) and getattr(self.cls, name, None) == fn):
            raise TypeError(f"{fn!r} is not {self.cls.__name__}.{name}")
        return name

    def _take_queued(self) -> list[Future[Any]]:
        """Take every queued task off the queue (its end markers left)."""
        taken: list[Future[Any]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return taken
            if item is None:
                self._queue.put(None)
                return taken
            taken.append(item[0])

    def _fail_queued(self, error: BaseException) -> None:
        """Fail every queued task with ``error`` (never under the lock: a
        future's done-callbacks run here, and may submit)."""
        for fut in self._take_queued():
            if fut.set_running_or_notify_cancel():  # (cancelled: wait() and as_completed() told)
                _settle(fut, exc=error)

    def _ran(self, fut: Future[Any], handle: WorkerHandle) -> bool:
        """Take a task that ran off ``_running``; was its worker cancelled?"""
        with self._lock:
            self._running.pop(fut, None)
            ending = handle._ending
            return ending is not None and ending.kind == "cancelled"

    def _handle_for(self, slot: int) -> WorkerHandle:
        """The slot's worker for its next task: a new one in place of one that
        ended (a crash, a kill from outside while it was idle: the task is not
        sent to a dead worker), or PoolBroken."""
        handle = self._handles[slot]
        if handle is not None:
            if not handle._ended_by_itself():
                return handle
            self._retire(slot, handle, crashed=True)
        with self._lock:
            if self._broken:
                raise PoolBroken(self._broken)
            if self._given_up:  # (no worker is made for a task that will not run)
                raise CancelledError("the pool was given up (Ctrl-C or a cancel) before this task ran")
            if self._crashed[slot]:
                self._crashed[slot] = False
                self.restarts += 1
        grants = self._worker_grants()
        try:
            # (called by name: no clash with its attributes)
            handle = self._broker._spawn(self.cls, self.timeout, grants)
        except WorkerCrashed as exc:
            if exc.exit is not None:  # a worker it started ended, if only in setup(): counted as any other
                self.exits.append(exc.exit)
                self.ended += 1
            if exc.exit is not None and exc.exit.reason.startswith(SETUP_FAILED):
                # Its setup(), the pool's initializer, or its sandbox entry raised: so will the
                # next one's. As ProcessPoolExecutor's pool breaks when its initializer fails;
                # a new worker per task, each failing alike, hid it (user trial 16).
                with self._lock:
                    first = self._broken is None
                    self._broken = self._broken or f"a new worker could not start: {exc.exit.reason}"
                    broken = PoolBroken(self._broken)
                if first:  # (the worker's setup() wrote the reason's text: escaped)
                    log.warning("pool %s: broken: %s", self.cls.__name__, printable(self._broken))
                self._fail_queued(broken)
            raise
        finally:
            for cap in (grants or {}).values():
                cap.close()  # (the worker has its own)
        self._handles[slot] = handle
        handle._on_idle_end = functools.partial(self._ended_while_idle, slot)
        return handle

    def _ended_while_idle(self, slot: int, handle: WorkerHandle) -> None:
        """On the idle watch's thread: the slot's worker ended between tasks
        (its end recorded). Retired now, on a thread of the broker's (a pool
        it breaks fails its queued futures, whose callbacks run there); its
        replacement starts with the slot's next task."""
        self._broker._background.soon(functools.partial(self._retire, slot, handle, True))

    def _worker_grants(self) -> dict[str, Capability] | None:
        """A worker's own open files of the pool's grants: with one shared by
        every worker (a dup), one that read a file without SEEK drained it for
        all the others and their replacements, and one's O_APPEND or
        directory position was theirs too (red-team round 36)."""
        if self._grants is None:
            return None
        reopen = self._broker._resolver.reopen
        fresh: dict[str, Capability] = {}
        try:
            for name, cap in self._grants.items():
                fresh[name] = reopen(cap) if cap.kind in (KIND_FILE, KIND_DIR) else copy.copy(cap)
        except BaseException:
            for cap in fresh.values():
                cap.close()
            raise
        return fresh

    def _retire(self, slot: int, handle: WorkerHandle, crashed: bool) -> None:
        """Let the slot's ended worker go. One that crashed with no restart
        left (``restart="never"``, ``max_restarts``) breaks the pool now:
        every queued task and every later submit raises PoolBroken."""
        assert handle.exit is not None
        broken = None
        with self._lock:
            if self._handles[slot] is not handle:
                return  # retired already: the idle watch's report and the slot's own raced
            self._handles[slot] = None
            if crashed:
                # (slots whose replacement is still to start count: two crashes at once must not
                # both take the last restart)
                due = self.restarts + sum(self._crashed)
                if self.restart == "never":
                    self._broken = self._broken or f"worker in slot {slot} ended and restart='never'"
                elif self.max_restarts is not None and due >= self.max_restarts:
                    self._broken = self._broken or (
                        f"worker in slot {slot} ended with no restart left (max_restarts={self.max_restarts}: "
                        f"{self.restarts} made, {due - self.restarts} more due)")
                else:
                    self._crashed[slot] = True
                broken = self._broken
            # Counted once the pool's state says what the end did to it (a reader of `ended` sees it).
            self.exits.append(handle.exit)
            self.ended += 1
        log.info("pool %s slot %d: worker %s ended (%s)", self.cls.__name__, slot, handle.name, handle.exit.kind)
        if broken:
            self._fail_queued(PoolBroken(broken))

    def _slot(self, slot: int) -> None:
        try:
            try:
                self._handle_for(slot)  # start now, not on the first task
            except Exception:
                pass  # reported by the first task that needs this worker
            while True:
                item = self._queue.get()
                if item is None:
                    break
                fut, method, args, kwargs, outputs, timeout = item
                # Each path lets the task's arguments go at once (del): this
                # frame is in a failed future's traceback, and waits for the
                # next task.
                if fut.cancelled():
                    fut.set_running_or_notify_cancel()  # (wait() and as_completed() told)
                    del item, args, kwargs
                    continue
                seconds = self.timeout if timeout is _POOLS else cast("float | None", timeout)
                # Running once it is sent: until then (its worker being made) a cancel() of
                # the future succeeds, as for a queued task, and says so (cancelled()).
                started = False
                while True:  # (again only for a worker that ended before the call was sent)
                    try:
                        handle = self._handle_for(slot)
                    except BaseException as exc:
                        del item, args, kwargs
                        with self._lock:
                            self._abandoned.discard(fut)
                        if fut.cancelled():  # (by its owner, meanwhile)
                            fut.set_running_or_notify_cancel()
                        else:  # (given up: cancelled, as the queued ones are)
                            _settle(fut, exc=exc, cancel=isinstance(exc, CancelledError) and not started)
                        if isinstance(exc, PoolBroken):
                            self._fail_queued(exc)
                        break
                    with self._lock:
                        abandoned = fut in self._abandoned or self._given_up
                        if abandoned:
                            self._abandoned.discard(fut)
                        elif started or fut.set_running_or_notify_cancel():
                            started = True
                            self._running[fut] = handle
                    if abandoned or not started:  # (not started: cancelled by its owner meanwhile)
                        del item, args, kwargs
                        if abandoned:
                            _settle(fut, cancel=not started, exc=CancelledError())
                        break
                    sent = handle.calls
                    try:
                        result = handle._call(method, args, kwargs, seconds, outputs)
                    except BaseException as exc:
                        cancelled = self._ran(fut, handle)
                        if handle.exit is not None and handle.calls == sent and not cancelled:
                            # Ended before the call was sent (a kill() of another thread, after
                            # _handle_for looked): the task never ran, and goes to the next worker.
                            self._retire(slot, handle, crashed=True)
                            continue
                        del item, args, kwargs
                        if handle.exit is not None:
                            # Retired before its caller hears: a pool with no restart left is broken by
                            # then, and a submit made on hearing of the crash is refused.
                            self._retire(slot, handle, crashed=True)
                        _settle(fut, exc=exc)
                    else:
                        del item, args, kwargs
                        cancelled = self._ran(fut, handle)
                        _settle(fut, result=result)
                        del result
                    self._after_task(slot, fut, handle, cancelled)
                    break
        except BaseException as exc:
            # A bug, not a worker's end: say so to every future still queued
            # rather than leave them waiting for a thread that is gone.
            log.exception("pool %s slot %d: its thread failed", self.cls.__name__, slot)
            with self._lock:
                self._broken = self._broken or f"the thread of slot {slot} failed: {type(exc).__name__}: {exc}"
                broken = PoolBroken(self._broken)
            self._fail_queued(broken)  # (the log has the traceback; the thread ends)
        finally:
            handle_left = self._handles[slot]
            if handle_left is not None and handle_left.exit is None:  # (dead but unrecorded too: stop() records it)
                handle_left.stop()
            self._slot_ended()

    def _slot_ended(self) -> None:
        with self._lock:
            self._slots_left -= 1
            grants = self._grants if self._slots_left == 0 else None
        for cap in (grants or {}).values():
            cap.close()

    def _after_task(self, slot: int, fut: Future[Any], handle: WorkerHandle, cancelled: bool) -> None:
        """Retire the worker that ran a task if it ended, or is due to be recycled."""
        with self._lock:
            self._abandoned.discard(fut)  # (a cancel between the two steps above)
        if cancelled and handle.exit is None:
            # A cancel that came as its call ended: it may be dying; ended here, not reused.
            with handle._lock:
                if handle.exit is None:
                    handle._kill()
                    handle._reap(5.0)
                    assert handle._ending is not None
                    handle._set_exit(handle._ending, asked=True)
        if handle.exit is not None:
            if self._handles[slot] is handle:
                self._retire(slot, handle, crashed=True)
        elif (self.recycle_after is not None and handle.calls >= self.recycle_after) or (
            self.max_rss is not None and (rss_bytes(handle.pid) or self.max_rss + 1) > self.max_rss
        ):  # (a live worker whose memory cannot be read is past any bound)
            # One that ended by itself meanwhile (right after answering) is a crash, not a recycle:
            # it counts against restart= and max_restarts (red-team round 30).
            ended = handle.stop()
            self._retire(slot, handle, crashed=ended.kind != "ok")


def _settle(fut: Future[Any], *, result: Any = None, exc: BaseException | None = None, cancel: bool = False) -> None:
    """End a task's future: cancelled (a task not started), or with ``exc``,
    or with ``result``. A done-callback that raises what is no Exception
    (SystemExit), which concurrent.futures lets out of ``set_result``, is
    logged as it logs an Exception: let out, it ended the slot's thread or
    the broker's background batch, and the futures it was to end next were
    never ended (a probe: 3 of 4 tasks left waiting for ever)."""
    try:
        if cancel:
            if fut.cancel():
                fut.set_running_or_notify_cancel()  # (what tells wait() and as_completed())
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass  # cancelled by its owner meanwhile (a task not started)
    except BaseException:
        log.exception("a done-callback of a pool task raised")


class PoolView(Executor):
    """A pool's tasks with a timeout of their own (``pool.with_timeout``), or
    named outputs (``pool.with_outputs``), or both (the two chain). It has
    ``submit`` and ``map``; shutting it down (or leaving a ``with`` block)
    does nothing: the pool is its owner's to shut down."""

    def __init__(self, pool: WorkerPool, outputs: frozenset[str] | None, timeout: object):
        self._pool = pool
        self._outputs = outputs
        self._timeout = timeout

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._pool._submit(fn, args, kwargs, self._outputs, self._timeout)

    def with_outputs(self, *paths: str | os.PathLike[str]) -> PoolView:
        return PoolView(self._pool, output_paths(paths), self._timeout)

    def with_timeout(self, seconds: float | None) -> PoolView:
        return PoolView(self._pool, self._outputs, call_timeout(seconds, "timeout"))

    @property
    def aio(self) -> AsyncPool:
        return AsyncPool(self._pool, self._outputs, self._timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class AsyncPool:
    """``pool.aio`` (or a view's): its tasks awaited on an event loop, the
    loop never blocked (each runs on its slot's thread, as ``submit`` does).
    Cancelling an awaited task (``task.cancel()``, ``asyncio.timeout``, a
    client that went away) takes it off the queue, or, once it runs, kills
    its worker, as an awaited call on a handle does; the pool replaces it
    (a restart). For a deadline on the task itself, ``pool.with_timeout``."""

    def __init__(self, pool: WorkerPool, outputs: frozenset[str] | None, timeout: object):
        self._pool = pool
        self._outputs = outputs
        self._timeout = timeout

    async def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """The task's result (or its exception)."""
        fut = self._pool._submit(fn, args, kwargs, self._outputs, self._timeout)
        del args, kwargs
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if fut.cancelled() and task is not None and not task.cancelling():
                # The pool cancelled it (shut down with the task queued), not this task's
                # owner: said as Executor says it, an Exception, never as this task's own
                # cancellation, which asyncio would take for the caller's (user trial 10).
                raise CancelledError("the pool was shut down before this task ran") from None
            self._pool._cancel(fut)
            raise
        except BaseException:
            fut = None  # type: ignore[assignment]  # (it holds the exception, whose traceback holds this frame)
            raise

    async def map(self, fn: Callable[..., Any] | str, *iterables: Any) -> list[Any]:
        """The results of ``fn`` over ``iterables``, in order; the first
        exception is raised once every task has ended (cancelling the map
        cancels the tasks)."""
        tasks = [asyncio.ensure_future(self.submit(fn, *args)) for args in zip(*iterables, strict=False)]
        try:
            done = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for result in done:
            if isinstance(result, BaseException):
                try:
                    raise result
                finally:
                    done = result = tasks = None  # type: ignore[assignment]  # (no cycle through this frame: see submit)
        return done


__all__ = ["AsyncPool", "PoolBroken", "PoolView", "WorkerPool"]
