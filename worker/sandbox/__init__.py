"""Sandbox enforcement on Linux: rlimits, namespaces, NO_NEW_PRIVS, Landlock,
seccomp (deny by default, violations reported through user notification).

Use::

    prepared = prepare(spec)        # parent, before fork: compiles the filter once
    ...fork...
    report = enter(prepared, keep)  # child, single-threaded: irreversible

See ``SandboxSpec`` for the knobs, ``probe()`` for what the kernel offers, and
the README's "What is enforced, and what is not" for each layer's gaps.
"""

from __future__ import annotations

import signal as _signal

from ._entry import Prepared, Report, enter, prepare
from ._libc import PR_SET_PDEATHSIG, prctl
from ._probe import probe
from ._seccomp_rules import ALWAYS_DENIED, DANGEROUS, GROUPS
from ._spec import VIOLATION_MODES, Limits, SandboxSpec

SYSCALL_GROUPS = tuple(sorted(GROUPS))
DANGEROUS_OPTIONS = tuple(sorted(DANGEROUS))


def set_parent_death_signal(sig: int) -> None:
    """Deliver ``sig`` to this process when the thread that forked it exits.

    It follows the forking *thread*, not the parent process: fork workers
    from a long-lived thread. The caller should check ``os.getppid()``
    afterwards for a parent that died before the call.
    """
    prctl(PR_SET_PDEATHSIG, int(_signal.Signals(sig)))


__all__ = [
    "ALWAYS_DENIED",
    "DANGEROUS_OPTIONS",
    "SYSCALL_GROUPS",
    "VIOLATION_MODES",
    "Limits",
    "Prepared",
    "Report",
    "SandboxSpec",
    "enter",
    "prepare",
    "probe",
    "set_parent_death_signal",
]
