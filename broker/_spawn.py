"""Starting a worker process by fork.

The child keeps only its channel (and grants), runs ``setup()``, enters the
sandbox and serves. The parent's objects are frozen out of the child's
garbage collector so that no broker object is finalized there, which could
otherwise close an fd number the child has reused.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from protocol._wire import seqpacket_pair
from worker import Worker
from worker._preload import preload
from worker._serve import child_main

from ._parent import as_parent


def fork_worker(
    cls: type[Worker], prepared: Any, grants: Sequence[tuple[str, int, int, Any]] = (),
    environ: dict[str, str] | None = None, lifeline: int | None = None,
) -> tuple[int, socket.socket]:
    """Fork a worker. Returns (pid, the broker's end of its channel).
    ``environ``: its environment, replacing the broker's (in ``os.environ``;
    the memory it forked with still holds the broker's). The fork is made
    from a thread that lives as long as this process (``as_parent``), so
    the worker takes the parent-death signal whichever thread asked.
    ``lifeline``: a read end of the broker's lifeline, for it to arm from
    (``worker._lifeline``)."""
    preload()  # (once, here in the broker: the child inherits the modules)
    parent_sock, child_sock = seqpacket_pair()
    try:
        pid = as_parent(functools.partial(_fork, cls, prepared, grants, environ, parent_sock, child_sock, lifeline))
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    return pid, parent_sock


#: One fork at a time (the main thread's and the parent thread's, for two
#: brokers): the collector's state is the process's.
_forking = threading.Lock()
#: While a fork is made: (the forking thread, whether the collector was on).
_collector_off: tuple[int, bool] | None = None


def _fork(
    cls: type[Worker], prepared: Any, grants: Sequence[tuple[str, int, int, Any]], environ: dict[str, str] | None,
    parent_sock: socket.socket, child_sock: socket.socket, lifeline: int | None,
) -> int:
    global _collector_off
    ppid = os.getpid()
    # A copy of the lifeline's read end for the child: the broker's fork hook closes the broker's there.
    life_copy = None if lifeline is None else fcntl.fcntl(lifeline, fcntl.F_DUPFD_CLOEXEC, 3)
    with _forking:
        _collector_off = (threading.get_ident(), gc.isenabled())
        gc.disable()
        gc.freeze()
        try:
            pid = os.fork()
            if pid == 0:  # child: never returns
                try:
                    parent_sock.detach()
                    if environ is not None:
                        os.environ.clear()
                        os.environ.update(environ)
                    child_main(cls, child_sock.detach(), prepared, grants, pdeathsig=True, parent_pid=ppid,
                               lifeline=life_copy)
                finally:
                    os._exit(70)
        finally:
            if os.getpid() == ppid:
                if life_copy is not None:
                    os.close(life_copy)
                was_enabled, _collector_off = _collector_off[1], None
                gc.unfreeze()
                if was_enabled:
                    gc.enable()
    return pid


def _after_fork_in_child() -> None:
    """A fork of the whole process by another thread (a pre-forking server)
    that came while ``_fork`` had the collector off and the heap frozen: the
    copy is a process like its parent, whose collector must run (it ran
    without one for good; red-team round 29). A worker ``_fork`` made keeps
    the freeze, on purpose (see the module's docstring)."""
    global _forking, _collector_off
    state, _collector_off = _collector_off, None
    _forking = threading.Lock()  # (held by the forking thread, which did not come along)
    if state is not None and state[0] != threading.get_ident():
        gc.unfreeze()
        if state[1]:
            gc.enable()


os.register_at_fork(after_in_child=_after_fork_in_child)
