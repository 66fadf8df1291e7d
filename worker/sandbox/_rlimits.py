"""Resource limits applied at entry. Private.

Soft and hard limits are set together, and only ever lowered, so the worker
cannot raise them again (``setrlimit`` is allowed by seccomp for that reason
only). RLIMIT_NPROC counts the processes (threads) of the worker's real uid:
a worker of a root broker gets a real uid of its own first
(``_namespaces.own_real_uid``), so it binds each worker alone; the kernel
exempts kuid 0 (INIT_USER), which such workers were before. It is set after
the user namespace is made (``apply_processes``): the kernel caps the
namespace's owner, all of that uid's processes, at the RLIMIT_NPROC its
creator had, and 64 there stopped every thread of a worker. RLIMIT_SIGPENDING
(queued signals, one per POSIX timer) likewise, to ``PENDING_SIGNALS``.
"""

from __future__ import annotations

import resource
from typing import Protocol


class LimitsLike(Protocol):
    @property
    def address_space(self) -> int | None: ...
    @property
    def open_files(self) -> int | None: ...
    @property
    def processes(self) -> int | None: ...
    @property
    def file_size(self) -> int | None: ...
    @property
    def cpu_seconds(self) -> int | None: ...


def _lower(which: int, value: int, hard_extra: int = 0) -> int:
    """Set soft = value (and hard = value + hard_extra), never above the hard limit; returns the soft limit."""
    _, hard = resource.getrlimit(which)
    inf = resource.RLIM_INFINITY
    soft_new = value if hard == inf else min(value, hard)
    hard_new = soft_new + hard_extra
    if hard != inf:
        hard_new = min(hard_new, hard)
    resource.setrlimit(which, (soft_new, hard_new))
    return soft_new


def apply(limits: LimitsLike) -> dict[str, int]:
    """Apply ``limits``; returns what was set, by name (core is always 0)."""
    applied: dict[str, int] = {}
    table = [
        ("address_space", resource.RLIMIT_AS, limits.address_space, 0),
        ("open_files", resource.RLIMIT_NOFILE, limits.open_files, 0),
        ("file_size", resource.RLIMIT_FSIZE, limits.file_size, 0),
        # SIGXCPU at the soft limit, SIGKILL one second later at the hard one
        ("cpu_seconds", resource.RLIMIT_CPU, limits.cpu_seconds, 1),
        ("core", resource.RLIMIT_CORE, 0, 0),
    ]
    for name, which, value, extra in table:
        if value is None:
            continue
        applied[name] = _lower(which, value, extra)
    return applied


#: Signals a worker may have queued, POSIX timers included (each holds one): by default it
#: inherited the broker's RLIMIT_SIGPENDING (96,365 here), and one worker that made that many
#: timers left every root process on the host unable to make one or to queue a signal.
PENDING_SIGNALS = 256


def apply_processes(limits: LimitsLike, own_namespace: bool) -> dict[str, int]:
    """RLIMIT_NPROC, and RLIMIT_SIGPENDING, once the user namespace is made
    (see above; the kernel counts both per user namespace level, so a limit
    set before would cap the namespace's owner too). RLIMIT_SIGPENDING only
    in a namespace of its own: outside one, the count it meets is its user's
    on the whole host."""
    applied: dict[str, int] = {}
    if limits.processes is not None:
        applied["processes"] = _lower(resource.RLIMIT_NPROC, limits.processes)
    if own_namespace:
        applied["pending_signals"] = _lower(resource.RLIMIT_SIGPENDING, PENDING_SIGNALS)
    return applied
