"""Spares are made at background priority. Private.

Making a spare (the zygote's fork and network namespace, the spare's own
setup() and sandbox entry when it makes its worker ahead) is work nobody
waits for, but it starts right as a spawn hands out the previous spare. At
normal priority it then competes with that spawn's handshake and first
call: on a 2-CPU machine a woken broker could wait a full scheduler slice
(1-3 ms) behind it. So the broker lowers the zygote to ``SCHED_IDLE`` (which
yields to any normal task at once) right before it asks for a spare; the
zygote comes back by itself when the spare is made, and the spare, forked
at SCHED_IDLE, waits there. The broker raises each spare back to
``SCHED_OTHER`` before it sends its request (raised before the wake-up,
the woken task may preempt; raised after, it would wait out the running
task's slice), and the zygote whenever it is to wait for it.

Only where the process may move a task out of ``SCHED_IDLE`` again: that
takes ``CAP_SYS_NICE`` (a root broker), since an unprivileged task may
lower its priority but never raise it back. Elsewhere nothing changes.
"""

from __future__ import annotations

import os
from types import TracebackType

CAP_SYS_NICE = 23


def may_raise() -> bool:
    """May this process move a task of its own back from SCHED_IDLE?"""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def to_background(pid: int) -> None:
    """SCHED_IDLE for another process (one that sleeps, typically: a running
    task lowered is not descheduled until its slice ends)."""
    os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def to_foreground(pid: int = 0) -> None:
    """Back to SCHED_OTHER (raises PermissionError without CAP_SYS_NICE,
    ProcessLookupError for a process that is gone)."""
    os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


def process_to_foreground(pid: int) -> None:
    """Every thread of ``pid`` back to SCHED_OTHER: a thread inherits its
    creator's policy, so threads a spare's setup() started while it waited
    are at SCHED_IDLE too (and the scheduler sets policy per thread). Passes
    until none is left at SCHED_IDLE, for threads made meanwhile by ones
    not raised yet. ProcessLookupError if the process is gone."""
    to_foreground(pid)
    for _ in range(8):
        raised = False
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            raise ProcessLookupError(pid) from None
        for tid in tids:
            try:
                if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                    to_foreground(tid)
                    raised = True
            except ProcessLookupError:
                pass  # a thread that ended
        if not raised:
            return


def _stat_fields(path: str) -> list[bytes]:
    """The fields of a /proc .../stat file after the command name (state,
    parent pid, ...): the name is in parentheses and may hold anything."""
    with open(path, "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()


def parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid`` (None if it is gone or /proc does
    not say)."""
    try:
        return int(_stat_fields(f"/proc/{pid}/stat")[1])
    except (OSError, ValueError, IndexError):
        return None


def cpu_state(pid: int) -> tuple[bool, int] | None:
    """(is any thread of process ``pid`` runnable, the CPU time its threads
    have had in ns); None if it is gone or /proc does not say."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    runnable, ran = False, 0
    for tid in tids:
        try:
            state = _stat_fields(f"/proc/{pid}/task/{tid}/stat")[0]
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                ran += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # (a thread that ended meanwhile)
        except (OSError, ValueError, IndexError):
            return None
        runnable = runnable or state == b"R"
    return runnable, ran


class Background:
    """The zygote making a spare at background priority (``enabled``: the
    broker asked for it, and we may come back). The broker lowered us to
    SCHED_IDLE before it asked (from its second request on, once we said we
    come back by ourselves): a child forked now inherits that. Normal
    priority again at the end.

    Only the broker lowers, and only right before it asks for a spare, when
    it waits for nothing else; whatever it sends later and waits for, it
    follows with :func:`to_foreground`. A task never lowers itself: at
    SCHED_IDLE next to busy CPUs it might not run again for a long while to
    notice that it is wanted. (Spares with a memory cgroup are made at
    normal priority: see ``broker._zygote.Zygote._ask_spare``.)"""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self) -> Background:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.enabled:
            to_foreground()


__all__ = [
    "Background", "cpu_state", "may_raise", "parent_of", "process_to_foreground", "to_background", "to_foreground",
]
