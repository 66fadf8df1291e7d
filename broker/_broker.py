"""The broker: keeps the authority, spawns workers, answers their requests."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import threading
import time
from typing import Any

from protocol import NotCapable, ProtocolError, Rights, WorkerCrashed
from protocol._messages import check_message
from protocol._remote import exception_from_wire
from protocol._rights import rights_from_wire
from protocol._wire import PROTOCOL_VERSION, Channel, ReceivedFd
from worker import Worker

from ._capability import Capability
from ._exit import WorkerExit
from ._handle import WorkerHandle, close_fds_in
from ._outputs import PendingOutput
from ._policy import Policy
from ._pool import WorkerPool
from ._resolve import Resolver
from ._spawn import fork_worker
from ._zygote import SPAWN_METHODS, Zygote, exec_worker, importable

audit_log = logging.getLogger("privsep.audit")


class _Unsandboxed:
    """Named dangerous option: run workers with no sandbox at all."""

    def __repr__(self) -> str:
        return "UNSANDBOXED"


#: Pass as ``Broker(..., sandbox=UNSANDBOXED)`` to run workers with no sandbox
#: (benchmark baselines, debugging). Never for hostile input.
UNSANDBOXED = _Unsandboxed()


class Broker:
    """Keeps the process's authority and hands out what the policy allows.

    Use it as a context manager; leaving the block stops every worker within
    a bounded time. Paths in the policy and in requests are beneath ``root``.
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
        request_rate: float | None = 2000.0,
        max_requests_per_call: int = 10_000,
    ):
        if not isinstance(policy, Policy):
            raise TypeError("Broker needs a Policy")
        self.policy = policy
        self.call_timeout = call_timeout
        self.spawn_timeout = spawn_timeout
        if spawn not in SPAWN_METHODS:
            raise ValueError(f"spawn must be one of {SPAWN_METHODS}")
        self.spawn_method = spawn
        self._zygote: Zygote | None = None
        self.request_rate = request_rate  # per worker, requests/s (burst = 1 s worth); None = unlimited
        self.max_requests_per_call = max_requests_per_call
        self._unsandboxed = sandbox is UNSANDBOXED
        if sandbox is not None and not self._unsandboxed:
            raise TypeError("sandbox= takes only UNSANDBOXED; set sandbox options on the Policy")
        self._resolver = Resolver(policy, root)
        self._workers: dict[int, WorkerHandle] = {}
        self._lock = threading.Lock()
        self._prepared: Any = None
        self._pools: list[WorkerPool] = []
        self._spawn_lock = threading.Lock()
        self._closed = False

    # -- context ----------------------------------------------------------
    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 2.0) -> None:
        """Stop every worker (killing those that do not stop within
        ``timeout``) and release the broker's directory fds."""
        if self._closed:
            return
        self._closed = True
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = list(self._workers.values())
        deadline = time.monotonic() + timeout
        for w in workers:
            try:
                w._chan.send({"t": "stop"})
            except (OSError, ProtocolError):
                pass
        for w in workers:
            w.stop(max(0.05, deadline - time.monotonic()))
        if self._zygote is not None:
            self._zygote.close()
        self._resolver.close()

    # -- authority --------------------------------------------------------
    def open(self, path: str, rights: Rights = Rights.READ) -> Capability:
        """Open a file the policy grants, as a capability to pass to a worker."""
        self._check_open()
        return self._resolver.open(path, Rights(rights))

    def opendir(self, path: str, rights: Rights = Rights.LOOKUP) -> Capability:
        self._check_open()
        return self._resolver.opendir(path, Rights(rights))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("broker is closed")

    # -- workers ----------------------------------------------------------
    def _prepare(self) -> Any:
        if self._unsandboxed:
            return None
        if self._prepared is None:
            from worker.sandbox import prepare

            self._prepared = prepare(self.policy.sandbox)
        return self._prepared

    def spawn(self, cls: type[Worker], *, timeout: float | None = None) -> WorkerHandle:
        """Start one sandboxed worker running ``cls``; return its handle.

        ``timeout`` is the default per-call timeout (else the broker's).
        Raises ``WorkerCrashed`` if ``setup()`` or sandbox entry fails.
        """
        handle = self._start(cls, timeout)
        try:
            if not handle._chan.wait_readable(self.spawn_timeout):
                raise handle._fail("timeout", f"setup did not finish within {self.spawn_timeout:g} s")
            self._await_ready(handle)
        except BaseException:
            if handle.exit is None:
                handle.kill()
            raise
        return handle

    async def aspawn(self, cls: type[Worker], *, timeout: float | None = None) -> WorkerHandle:
        """``spawn()`` for asyncio: waits for the worker on the event loop."""
        handle = self._start(cls, timeout)
        try:
            if await handle._event(time.monotonic() + self.spawn_timeout) == "timeout":
                raise handle._fail("timeout", f"setup did not finish within {self.spawn_timeout:g} s")
            self._await_ready(handle)
        except BaseException:
            if handle.exit is None:
                handle.kill()
            raise
        return handle

    def pool(self, cls: type[Worker], size: int | None = None, **options: Any) -> WorkerPool:
        """A pool of ``size`` workers (default: CPU count) with Executor
        semantics. Options: ``timeout``, ``recycle_after``, ``max_rss``,
        ``restart`` ("always"/"never"), ``max_restarts``."""
        self._check_open()
        pool = WorkerPool(self, cls, size or os.cpu_count() or 1, **options)
        self._pools.append(pool)
        return pool

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _start(self, cls: type[Worker], timeout: float | None) -> WorkerHandle:
        self._check_open()
        if not (isinstance(cls, type) and issubclass(cls, Worker)):
            raise TypeError("spawn() takes a Worker subclass")
        method = self.spawn_method
        if method == "auto":
            method = "zygote" if importable(cls) else "fork"
        elif method in ("zygote", "exec") and not importable(cls):
            raise TypeError(
                f"spawn={method!r} needs {cls.__qualname__} importable by module name (not in __main__ or a function)"
            )
        spec_wire = None if self._unsandboxed else self.policy.sandbox.to_wire()
        reaper = None
        with self._spawn_lock:
            if method == "zygote":
                if self._zygote is None:
                    self._zygote = Zygote()
                pid, sock = self._zygote.spawn(cls, spec_wire, self.spawn_timeout)
                reaper = self._zygote.reap
            elif method == "exec":
                pid, sock, proc = exec_worker(cls, spec_wire, self.spawn_timeout)
                reaper = _popen_reaper(proc)
            else:
                pid, sock = fork_worker(cls, self._prepare())
        handle = WorkerHandle(
            self,
            cls,
            pid,
            Channel(sock),
            timeout=timeout if timeout is not None else self.call_timeout,
            violation=self.policy.sandbox.violation,
            reaper=reaper,
        )
        handle.spawn_method = method
        with self._lock:
            self._workers[handle.id] = handle
        return handle

    def _await_ready(self, handle: WorkerHandle) -> None:
        """Read and check the worker's handshake (the channel is readable)."""
        chan = handle._chan
        try:
            msg = chan.recv()
        except ProtocolError as exc:
            raise handle._fail("protocol", str(exc)) from exc
        if msg is None:
            raise handle._died()
        try:
            check_message(msg, frozenset({"ready", "fail"}))
        except ProtocolError as exc:
            close_fds_in(msg)
            raise handle._fail("protocol", str(exc)) from exc
        if msg["t"] == "fail":
            cause = exception_from_wire(msg["e"])
            handle._reap(1.0)
            handle._set_exit(WorkerExit("crashed", f"setup or sandbox entry failed: {cause}"))
            raise WorkerCrashed(f"worker {handle.name}: setup or sandbox entry failed: {cause}", handle.exit) from cause
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
        close_fds_in(msg["sandbox"])
        handle.sandbox = msg["sandbox"]
        self._audit(handle, "spawn", handle.cls.__qualname__, None, "granted", "worker ready")

    def _forget(self, handle: WorkerHandle) -> None:
        with self._lock:
            self._workers.pop(handle.id, None)

    @property
    def workers(self) -> list[WorkerHandle]:
        with self._lock:
            return list(self._workers.values())

    # -- requests from workers --------------------------------------------
    def _serve_request(
        self, handle: WorkerHandle, op: str, args: dict[str, Any], outputs: list[PendingOutput]
    ) -> tuple[Any, Any]:
        """Answer one request. Returns (reply value, object to close after sending)."""
        path = args.get("path")
        rights: Rights | None = None
        try:
            if "rights" in args:
                try:
                    rights = rights_from_wire(args["rights"])
                except ProtocolError as exc:
                    raise NotCapable(str(exc)) from None
            if op == "open":
                assert rights is not None
                cap = self._resolver.open(path, rights)
                result: tuple[Any, Any] = (cap, cap)
            elif op == "create":
                assert rights is not None
                pending, cap = self._resolver.create(path, rights)
                outputs.append(pending)
                result = (cap, cap)
            elif op == "opendir":
                assert rights is not None
                cap = self._resolver.opendir(path, rights)
                result = (cap, cap)
            elif op == "stat":
                result = (self._resolver.stat(path), None)
            elif op == "listdir":
                result = (self._resolver.listdir(path), None)
            else:  # check_message already refused unknown ops
                raise NotCapable(f"unknown request {op!r}")
        except NotCapable as exc:
            self._audit(handle, op, path, rights, "denied", exc.strerror or str(exc))
            raise
        except OSError as exc:
            self._audit(handle, op, path, rights, "failed", exc.strerror or str(exc))
            raise
        self._audit(handle, op, path, rights, "granted", "")
        return result

    def _audit(self, handle: WorkerHandle, op: str, path: Any, rights: Rights | None, decision: str, reason: str) -> None:
        if not audit_log.isEnabledFor(logging.INFO):
            return
        event = {
            "worker": handle.id,
            "pid": handle.pid,
            "request": op,
            "path": path if isinstance(path, str) else repr(path),
            "rights": rights.describe() if rights is not None else None,
            "decision": decision,
            "reason": reason,
        }
        audit_log.info(
            "%s %s %s %s%s",
            handle.name,
            op,
            event["path"],
            decision,
            f" ({reason})" if reason else "",
            extra={"privsep": event},
        )


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


__all__ = ["UNSANDBOXED", "Broker", "select"]
