"""Kernel feature probes, cached. Private; ``probe()`` is public.

``seccomp_features()`` is cheap (a few failing syscalls) and is what
``prepare()`` uses. ``probe()`` adds Landlock, openat2 and a forked child that
tries the namespaces, for ``privsep check`` and test skips.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
from typing import Any

from .._interrupts import through_interrupts
from . import _landlock, _seccomp
from ._libc import PR_GET_NO_NEW_PRIVS, PR_GET_SECCOMP, ffi, lib

SYS_OPENAT2 = 437
AT_FDCWD = -100


@functools.cache
def seccomp_features() -> dict[str, Any]:
    mode = int(lib.prctl(PR_GET_SECCOMP, 0, 0, 0, 0))
    listener_flag = _seccomp.flags_supported(_seccomp.FLAG_NEW_LISTENER)
    notify = _seccomp.action_available(_seccomp.RET_USER_NOTIF) and listener_flag
    killable = notify and _seccomp.flags_supported(_seccomp.FLAG_NEW_LISTENER | _seccomp.FLAG_WAIT_KILLABLE_RECV)
    return {
        "seccomp": mode >= 0 and _seccomp.action_available(_seccomp.RET_KILL_PROCESS),
        "seccomp_mode": mode,
        "user_notif": notify,
        "wait_killable_recv": killable,
        # ADDFD came in 5.9, WAIT_KILLABLE_RECV in 6.0: the flag proves the ioctl
        "addfd": killable or (_kernel_at_least(5, 9) and notify),
        "notif_sizes": _seccomp.notif_sizes(),
        "tsync": _seccomp.flags_supported(_seccomp.FLAG_TSYNC),
    }


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = platform.release().split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def _openat2() -> bool:
    how = ffi.new("uint64_t[3]", [os.O_PATH | os.O_CLOEXEC, 0, 0])
    path = ffi.new("char[]", b"/")
    fd = int(lib.syscall(ffi.cast("long", SYS_OPENAT2), ffi.cast("long", AT_FDCWD), path, how, ffi.cast("long", 24)))
    if fd >= 0:
        os.close(fd)
        return True
    return False


def _nnp() -> bool:
    return int(lib.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)) >= 0


def _namespaces() -> list[str]:
    """Fork a child that enters what it can, exactly as ``enter`` would."""
    from . import _namespaces

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.write(w, ",".join(_namespaces.apply()).encode())
        finally:
            os._exit(0)
    try:
        os.close(w)
        data = os.read(r, 256).decode()
    finally:
        try:
            os.close(r)
        finally:
            _wait_for(pid)
    return [x for x in data.split(",") if x]


def _wait_for(pid: int) -> None:
    """Reap the probe's child, a Ctrl-C meanwhile raised once it is reaped:
    raised in the wait (or in the close before it), it left the child a
    zombie of the broker's for good, one more at each call that probed
    again (a probe: 8 after 40 interrupted calls)."""
    through_interrupts(lambda: os.waitpid(pid, 0), done_on=(ChildProcessError,))


@functools.cache
def probe() -> dict[str, Any]:
    """What this kernel gives. Cached for the life of the process."""
    abi = _landlock.abi_version()
    out: dict[str, Any] = {"kernel": platform.release(), "machine": platform.machine()}
    out.update(seccomp_features())
    out["no_new_privs"] = _nnp()
    out["landlock_abi"] = abi
    out["landlock_errata"] = _landlock.errata() if abi else 0
    out["landlock_features"] = {
        "fs": abi >= 1,
        "refer": abi >= 2,
        "truncate": abi >= 3,
        "net_tcp": abi >= 4,
        "ioctl_dev": abi >= 5,
        "scope_abstract_unix": abi >= 6,
        "scope_signal": abi >= 6,
        "audit_flags": abi >= 7,
    }
    out["openat2"] = _openat2()
    try:
        out["namespaces"] = _namespaces()
    except OSError as exc:
        out["namespaces"] = []
        out["namespaces_error"] = errno.errorcode.get(exc.errno or 0, str(exc))
    out["minimum_met"] = bool(out["seccomp"] and out["no_new_privs"] and out["openat2"])
    return out
