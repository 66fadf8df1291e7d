"""Delivering a grant to a worker after its sandbox is entered.

Linux keeps no rights mask per fd, so a later grant is delivered in the form
whose kernel-visible powers match its rights (see
``worker.sandbox._rights_table``): the file itself; the file reopened by the
Landlock-restricted opener (no truncate); or a pipe that a broker thread
fills from the file or drains into it (no seek, no fstat of the file).
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from protocol import NotCapable, Rights
from protocol._wire import KIND_FILE, KIND_STREAM, Channel, ReceivedFd, seqpacket_pair
from worker._interrupts import through_interrupts
from worker.sandbox._rights_table import NO_TRUNCATE, PIPE_READ, PIPE_WRITE, later_file_plan

from ._capability import Capability
from ._exit import returncode_text
from ._interp import child_env, interpreter
from ._parent import as_parent

_CHUNK = 1 << 16
_SMALL = 60 * 1024  # below the default 64 KiB pipe buffer: written at once


class Pump(threading.Thread):
    """Copies ``src`` to ``dst`` until EOF or until the far end goes away.
    Owns both fds. ``pread`` mode reads the source from offset 0."""

    def __init__(
        self,
        src: int,
        dst: int,
        *,
        from_start: bool,
        name: str,
        limit: int | None = None,
        on_end: Callable[[], None] | None = None,
    ):
        super().__init__(name=f"privsep-pump {name}", daemon=True)
        self.src, self.dst, self.from_start = src, dst, from_start
        self.on_end = on_end  # called once both fds are closed
        self.limit = limit  # bytes; a worker writing through a pipe is not under its own RLIMIT_FSIZE
        self.error: OSError | None = None
        self.copied = 0

    def run(self) -> None:
        try:
            while True:
                chunk = os.pread(self.src, _CHUNK, self.copied) if self.from_start else os.read(self.src, _CHUNK)
                if not chunk:
                    break
                if self.limit is not None and self.copied + len(chunk) > self.limit:
                    raise OSError(errno.EFBIG, f"output exceeds its {self.limit}-byte limit")
                view = memoryview(chunk)
                while view:
                    n = os.write(self.dst, view)
                    view = view[n:]
                self.copied += len(chunk)
        except BrokenPipeError:
            pass  # the worker closed its end early: fine
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.src)
            os.close(self.dst)
            if self.on_end is not None:
                self.on_end()


class Drain:
    """An output written by the worker through a pipe, copied into the file
    by the call's own poll loop (no thread): ``step()`` when the pipe is
    readable, ``finish()`` when the call has returned. Owns both fds."""

    def __init__(self, src: int, dst: int, limit: int | None):
        os.set_blocking(src, False)
        self.src, self.dst, self.limit = src, dst, limit
        self.copied = 0
        self.error: OSError | None = None
        self.done = False

    def step(self) -> bool:
        """Copy what is there; False once the worker closed its end (or on error)."""
        if self.done:
            return False
        try:
            while True:
                try:
                    chunk = os.read(self.src, _CHUNK)
                except BlockingIOError:
                    return True
                if not chunk:
                    self.done = True
                    return False
                if self.limit is not None and self.copied + len(chunk) > self.limit:
                    raise OSError(errno.EFBIG, f"output exceeds its {self.limit}-byte limit")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.dst, view) :]
                self.copied += len(chunk)
        except OSError as exc:
            self.error, self.done = exc, True
            # Close our end now: the worker's next write fails (EPIPE)
            # instead of blocking on a pipe nobody reads.
            if self.src >= 0:
                os.close(self.src)
                self.src = -1
            return False

    def closed(self) -> bool:
        """Is every write end of the pipe closed (the worker's and any copy of
        it)? Data may still wait in the pipe: ``finish()`` copies it."""
        if self.done or self.src < 0:
            return True
        poller = select.poll()
        poller.register(self.src, select.POLLIN)  # (POLLHUP is always reported)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))

    def finish(self) -> None:
        """Copy what is left once the call has answered. The worker closed its
        outputs before answering, so no write end may be left: then what the
        pipe still holds is all there is, read at once. A write end still
        open was kept by the worker, and is not waited for."""
        if not self.done and (not self.closed() or self.step()):
            raise OSError(errno.EIO, "still open in the worker after the call returned (a copy of it was kept)")
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        for attr in ("src", "dst"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)


class Outgoing:
    """What actually travels: an fd plus the rights the worker will see.
    Owns ``fd`` when ``owned`` (closed after sending)."""

    __slots__ = ("fd", "kind", "owned", "rights")

    def __init__(self, fd: int, kind: int, rights: Rights, owned: bool):
        self.fd, self.kind, self.rights, self.owned = fd, kind, rights, owned

    def __privsep_fd__(self) -> tuple[int, int, Rights]:
        return self.fd, self.kind, self.rights

    def release(self) -> None:
        if self.owned and self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class _OpenerExited(BrokenPipeError):
    """The restricted opener ended before it answered (killed from outside,
    say): nothing of the request took effect."""


class Opener:
    """The broker's side of the restricted opener process (started lazily)."""

    answer_timeout = 10.0  # (seconds; a class setting, for tests)

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        ours, theirs = seqpacket_pair()
        # The kernel sends the parent-death signal when the starting thread ends (from a pool's
        # thread, it killed the opener mid-request for another thread at shutdown): as_parent
        # starts it from a thread that lives as long as this process.
        try:
            self._proc = as_parent(lambda: subprocess.Popen(
                interpreter("worker._opener", str(theirs.fileno()), "--pdeathsig"),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=child_env(environ),
                process_group=0,  # a Ctrl-C at the terminal is the broker's to handle, as for the zygote
            ))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._chan = Channel(ours, send_timeout=10.0)
        self._lock = threading.Lock()
        try:
            answered = self._chan.wait_readable(30.0)
            ready = answered and self._chan.recv() == {"t": "ready"}
        except BaseException:
            # A Ctrl-C while it started: ended, not left running with no one to end it (the
            # broker never got this object): a probe left one opener per interrupted start.
            self._chan.close()
            self._end()
            raise
        if not ready:
            self.close()
            why = f"exit status {self._proc.returncode}; its stderr says why" if answered else "no answer in 30 s"
            raise NotCapable(f"the restricted opener failed to start ({why}): it needs Landlock ABI 3 or later")

    def open(self, fd: int, flags: int) -> int:
        """Reopen ``fd`` (or create an O_TMPFILE in directory ``fd``) inside
        the opener's domain. Returns a new fd the caller owns."""
        with self._lock:
            if self._chan.sock.fileno() < 0:  # closed since the caller got us: replaced once we had exited
                raise self._exited()
            try:
                self._chan.send({"t": "open", "fd": Outgoing(fd, KIND_FILE, Rights.NONE, False), "flags": flags})
                if not self._chan.wait_readable(self.answer_timeout):
                    # Its late answer would be taken for the next request's: another file, maybe
                    # for another worker. Ended here; _opener() starts a new one for the next.
                    self._end()
                    raise OSError(
                        errno.ETIMEDOUT,
                        f"restricted opener did not answer within {self.answer_timeout:g} s (ended; the next "
                        "file it must reopen starts a new one)",
                    )
                reply = self._chan.recv()
            except (BrokenPipeError, ConnectionResetError):  # (it died before it read the request)
                reply = None
            except BaseException:
                # A Ctrl-C during the wait (or the send: it may be on its way): ended too, for the
                # same reason. Its answer, an fd for this file, went to the next request.
                self._end()
                raise
            if reply is None:
                self._end()
                raise self._exited()
            if type(reply) is dict and reply.get("t") == "opened" and isinstance(reply.get("fd"), ReceivedFd):
                return int(reply["fd"].detach())
            if type(reply) is dict and reply.get("t") == "error" and isinstance(reply.get("errno"), int):
                raise OSError(reply["errno"], os.strerror(reply["errno"]))
            self._end()  # (out of step with us: what it says next cannot be trusted either)
            raise OSError(errno.EPROTO, "restricted opener sent a malformed reply (ended; the next file it must "
                          "reopen starts a new one)")

    def _end(self) -> None:
        """Kill and reap the opener, so that alive() says so at once; an
        interrupt meanwhile (a Ctrl-C) is raised once it is reaped, not left
        a zombie of the broker's."""
        self._proc.kill()
        through_interrupts(self._proc.wait)

    def _exited(self) -> _OpenerExited:
        return _OpenerExited(
            errno.EPIPE,
            f"the restricted opener has exited ({returncode_text(self._proc.returncode)}; the next file it must reopen "
            "starts a new one)",
        )

    def alive(self) -> bool:
        return self._proc.poll() is None

    def forked_copy(self) -> None:
        """In a forked child: close this copy's end of the parent's opener."""
        self._lock = threading.Lock()
        self._chan.close()

    def close(self) -> None:
        with self._lock:  # (after a request of another thread's: the next one finds the channel closed)
            self._chan.close()
        try:
            self._proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _fill_small(src: int, w: int) -> bool:
    """Write a file that fits in the pipe buffer at once and close both ends.
    Returns False (nothing written) for larger files."""
    try:
        size = os.fstat(src).st_size
        if size > _SMALL:
            return False
        data = os.pread(src, _SMALL + 1, 0)
        if len(data) > _SMALL:
            return False
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
    except BlockingIOError:
        return False
    os.close(src)
    os.close(w)
    return True


def _reopened(opener: Callable[[], Opener], fd: int, flags: int) -> int:
    """``fd`` reopened by the restricted opener; once more, by a new one, if
    it had exited (killed from outside, say: the requests of other threads
    then failed, with EBADF where they held it as the broker replaced it).
    Nothing of the first request took effect: a reopen has no other effect,
    and an O_TMPFILE it made went with it."""
    try:
        return opener().open(fd, flags)
    except _OpenerExited:
        return opener().open(fd, flags)


def deliver(
    cap: Capability,
    plan: str,
    rights: Rights,
    opener: Any,
    flags: int,
    limit: int | None = None,
    *,
    drain: bool = False,
    on_end: Callable[[], None] | None = None,
) -> tuple[Outgoing, Pump | Drain | None]:
    """Make the object that travels for ``cap`` under a ``plan`` that needs
    more than the fd itself (a PLAIN file travels as itself: the caller
    sends ``Outgoing(cap.fileno(), KIND_FILE, rights, False)``). With
    ``drain``, a write pipe is emptied by the caller's loop (a ``Drain``)
    rather than by a thread. ``on_end``: called when a pump made here ends."""
    if plan not in (NO_TRUNCATE, PIPE_READ, PIPE_WRITE):
        raise ValueError(f"deliver() has nothing to make for plan {plan!r}")
    if plan == NO_TRUNCATE:
        return Outgoing(_reopened(opener, cap.fileno(), flags), KIND_FILE, rights, owned=True), None
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        src = os.dup(cap.fileno())
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if plan == PIPE_READ:
        out = Outgoing(r, KIND_STREAM, rights, owned=True)
        if _fill_small(src, w):
            return out, None  # it all fit in the pipe: no thread needed
        pump = Pump(src, w, from_start=True, name=cap.name, on_end=on_end)
    else:  # PIPE_WRITE
        if drain:
            return Outgoing(w, KIND_STREAM, rights, owned=True), Drain(r, src, limit)
        pump = Pump(r, src, from_start=False, name=cap.name, limit=limit, on_end=on_end)
        out = Outgoing(w, KIND_STREAM, rights, owned=True)
    pump.start()
    return out, pump


__all__ = ["Drain", "Opener", "Outgoing", "Pump", "deliver", "later_file_plan"]
