"""A worker dies, with what it forked, the moment its broker does.

The parent-death signal comes from the exit of the process that forked a
worker: for a zygote's worker, the zygote's, which itself gets the signal
when the broker dies. So the worker died only once its zygote had finished
dying, and a zygote starved of CPU (at SCHED_IDLE making a spare, with busy
tasks on every CPU) took seconds to, while a busy worker ran on. And the
signal never reached what a worker forked (allow-fork, or unsandboxed):
that ran on, an orphan.

A lifeline is a pipe whose write end only the broker holds and never
writes to. Each worker (and spare) opens its own open file description of
the read end (through ``/proc/self/fd``), owned by its process group, with
``O_ASYNC`` and ``F_SETSIG`` = SIGKILL. When the last write end closes,
however the broker ends, the kernel's release of the pipe signals the owner
of every reader's description: each worker's process group (the worker and
what it forked, which cannot leave the group under the filter) is killed
from the broker's own exit. A zygote has a lifeline of its own, which its
``close()`` ends (``broker._zygote``); workers forked or exec'd from the
broker share one of the broker's (``broker._lifeline``), which the
broker's ``close()`` ends.
The parent-death signal stays as the second way for the worker itself.

What it is not: a compromised worker may clear ``O_ASYNC`` on its own
description (``F_SETFL`` is allowed with ``O_APPEND``) or close it, which
only gives up its own early death (and its children's): it still dies with
its parent. It cannot point the signal at another process or change it
(the filter denies ``F_SETOWN`` and ``F_SETSIG``). Only the broker may
hold a write end: a write into the pipe would signal every armed reader
(the kernel's ``POLL_IN`` notice) and so kill them all. It is close-on-exec
and passed to no one; a copy of the broker made by ``fork()`` (a worker
forked from it among them) closes its copies in the broker's fork hooks,
before any code of the user's runs there; a sandboxed worker cannot reopen
its read end for writing: no ``/proc`` in its namespace, ``openat`` only
beneath a granted directory under the filter, and the pipe is mode 0400
to workers, which lack CAP_DAC_OVERRIDE (escape and ablation cases).
Linux only (``F_SETSIG``); where a worker cannot arm (no ``/proc``, no fd
left under its limit), the parent-death signal alone.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import sys

#: Where a worker keeps its description of the lifeline, room permitting:
#: above the fds a small ``Limits.open_files`` leaves the worker (an fd above
#: RLIMIT_NOFILE stays open), so the lifeline takes none of them; below 64,
#: the size of the fd table every process starts with.
PREFERRED_SLOT = 63

#: Can this system arm a lifeline at all?
AVAILABLE = sys.platform.startswith("linux") and hasattr(fcntl, "F_SETSIG")

#: Where this process keeps its armed description, once its fds are settled; -1: none.
slot = -1


def arm(shared_fd: int) -> int | None:
    """In a worker or spare just started (single-threaded, before any
    sandbox, after it made its own process group), from ``shared_fd``, a
    read end of a lifeline it inherited: a new fd on that pipe whose closing
    write end SIGKILLs this process and its group, for the caller to settle
    (``worker._serve._settle_fds``, which records its ``slot``). Ends the
    process at once if the broker's end is already closed. None where it
    cannot be made (no ``/proc``)."""
    if not AVAILABLE:
        return None
    try:
        fd = os.open(f"/proc/self/fd/{shared_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # Its process group where it leads one (a worker always does: what it forks, with
        # allow-fork or unsandboxed, stays in it and dies with it); else itself alone.
        me = os.getpid()
        fcntl.fcntl(fd, fcntl.F_SETOWN, -me if os.getpgrp() == me else me)
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGKILL)
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK | os.O_ASYNC)
    except OSError:
        os.close(fd)
        return None
    # Closed before we were armed: no signal comes, but the pipe says so (POLLHUP).
    if _hung_up(fd):
        os._exit(0)
    return fd


def place(highest: int, moving: int) -> int:
    """The fd to keep the lifeline at, above ``highest`` (the other fixed
    slots), where ``moving`` fds can still be moved through temporaries
    above it within the fd limit; -1 if there is no room."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = soft - 1 - moving if soft != resource.RLIM_INFINITY else PREFERRED_SLOT
    slot = max(highest + 1, min(PREFERRED_SLOT, room))
    return slot if slot <= room else -1


def _hung_up(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))
