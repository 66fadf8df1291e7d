"""prepare() in the parent, enter() in the forked child. Private."""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocol import SandboxError
from protocol._wire import use_blob_region

from . import _caps, _landlock, _namespaces, _rlimits, _seccomp
from ._libc import PR_SET_NO_NEW_PRIVS, ffi, lib, prctl
from ._probe import seccomp_features
from ._seccomp_rules import GROUPS_NEED_LANDLOCK
from ._spec import SandboxSpec

SYS_CLOSE_RANGE = 436
M_ARENA_MAX = -8

ffi.cdef("int mallopt(int param, int value);")


@dataclass(frozen=True)
class Prepared:
    """A spec with its seccomp filter already compiled (done once, before fork)."""

    spec: SandboxSpec
    groups: tuple[str, ...]
    compiled: _seccomp.Compiled | None
    notify: bool  # the kernel can give a listener
    wait_killable: bool


class Report(dict[str, Any]):
    """What entry applied; msgpack-able as a plain dict.

    Keys: ``layers`` (in order, e.g. ``["rlimits", "namespaces:user,net,...",
    "capabilities", "no_new_privs", "landlock:abi7", "seccomp:notify"]``), ``landlock_abi``,
    ``namespaces``, ``rlimits``, ``seccomp`` (``notify``/``kill``/``errno``/
    ``off``), ``seccomp_insns``, ``groups``, ``dangerous``, ``fs_rules``
    (``[fd, landlock access]`` added), ``entry_us``, ``real_uid`` (the real
    uid of its own, or None: ``_namespaces.own_real_uid``), and ``notify_fd``: the
    listener fd (or None). The caller must send ``notify_fd`` to the broker
    and close it before running anything untrusted: a worker holding its own
    listener could answer its own notifications (its ioctls are denied by the
    filter too, as a second line).
    """

    @property
    def listener_fd(self) -> int | None:
        fd = self.get("notify_fd")
        return fd if isinstance(fd, int) else None


@functools.lru_cache(maxsize=32)
def prepare(spec: SandboxSpec) -> Prepared:
    """Compile the seccomp filter for ``spec`` (cached by spec). Call before
    fork so the child only patches in its pid and loads the program."""
    if not isinstance(spec, SandboxSpec):
        raise TypeError("prepare() takes a SandboxSpec")
    groups = spec.effective_groups()
    feats = seccomp_features()
    compiled = _seccomp.compile_filter(groups, spec.dangerous, spec.fd_rules) if spec.seccomp else None
    if spec.seccomp and not feats["seccomp"]:
        raise SandboxError("this kernel has no seccomp filter mode")
    _warm()
    return Prepared(spec, groups, compiled, bool(feats["user_notif"]), bool(feats["wait_killable_recv"]))


@functools.cache
def _warm() -> None:
    """Make cffi parse every C type and build every call interface entry will
    use, here in the parent: the first use of each costs 0.3-1 ms, and a
    forked child inherits the caches. Each call fails harmlessly (EINVAL,
    EBADF, EFAULT) or changes nothing."""
    _caps.warm()
    _landlock.warm()
    _seccomp.warm()
    _namespaces.warm()
    ffi.new("char[]", b"x")
    lib.syscall(ffi.cast("long", SYS_CLOSE_RANGE), ffi.cast("unsigned int", 1), ffi.cast("unsigned int", 0),
                ffi.cast("unsigned int", 0))  # lo > hi: EINVAL
    lib.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
    _ = lib.mallopt  # resolve only: calling it would change the parent's malloc


def _single_thread() -> None:
    # /proc/PID/task links one entry per thread, plus "." and "..": one stat
    # instead of reading the directory.
    try:
        threads = os.stat("/proc/self/task").st_nlink - 2
    except OSError as exc:
        raise SandboxError(f"cannot prove the process is single-threaded: {exc.strerror}") from exc
    if threads != 1:
        raise SandboxError(
            f"sandbox entry needs a single-threaded process; {threads} threads are running"
            " (a thread started in setup()? Start threads in an @rpc call: they may run there)"
        )


def _close_all_but(keep: Sequence[int]) -> None:
    want = sorted({fd for fd in keep if fd >= 0})
    for fd in want:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise SandboxError(f"fd {fd} to keep is not open") from exc
    lo = 0
    for fd in [*want, -1]:
        hi = 0xFFFFFFFF if fd < 0 else fd - 1
        if hi >= lo and int(lib.syscall(ffi.cast("long", SYS_CLOSE_RANGE), ffi.cast("unsigned int", lo),
                                         ffi.cast("unsigned int", hi), ffi.cast("unsigned int", 0))) != 0:
            raise SandboxError(f"close_range: {os.strerror(ffi.errno)}")
        lo = fd + 1
    # stdio slots that were closed get /dev/null, so a stray print() can never
    # land in a channel or grant that later takes fd 0, 1 or 2
    missing = [fd for fd in (0, 1, 2) if fd not in want]
    if missing:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in missing:
            if fd != null:
                os.dup2(null, fd, inheritable=False)
        if null not in missing:
            os.close(null)


# Counted once, where this module is imported (the zygote, before it forks): os.cpu_count()
# reads /sys/devices/system/cpu/online, three syscalls on every spawn's path otherwise.
_CPUS = os.cpu_count() or 1


def _pin_malloc_arenas() -> None:
    """Fix glibc's arena limit now. Otherwise the 9th thread that mallocs
    makes glibc read /sys/devices/system/cpu/online (openat AT_FDCWD), which
    the sandbox denies. Same value glibc would compute: 8 per CPU."""
    lib.mallopt(M_ARENA_MAX, 8 * _CPUS)


def _pin_cpu_count() -> None:
    """``os.cpu_count()`` (``ThreadPoolExecutor``'s default size,
    ``multiprocessing.cpu_count()``) reads the same file, and the worker was
    killed for it: it answers with the count taken before instead."""
    os.cpu_count = _cpu_count


def _directories(fds: Sequence[int]) -> list[int]:
    """The fds of ``fds`` that are directories (one that is not open is
    Landlock's to refuse, as before)."""
    dirs = []
    for fd in fds:
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                dirs.append(fd)
        except OSError:
            pass
    return dirs


def _cpu_count() -> int:
    return _CPUS


def enter(prepared: Prepared, keep_fds: Sequence[int], *, net_fd: int | None = None) -> Report:
    """Enter the sandbox, for good. Call in a single-threaded forked child.

    ``net_fd``: a fresh network namespace made ahead of time
    (``_namespaces.fresh_net``); entry joins it instead of creating one and
    closes the fd.

    Order: close every fd not in ``keep_fds`` -> rlimits (RLIMIT_NPROC
    after the namespaces) -> a real uid of its own (root) -> namespaces ->
    drop all capabilities -> NO_NEW_PRIVS -> Landlock -> seccomp. Raises SandboxError when a demanded
    layer cannot be applied; the process is then half-sandboxed and must exit.
    """
    if sys.platform.startswith("freebsd"):
        return _enter_capsicum(prepared, keep_fds)
    t0 = time.perf_counter()
    spec = prepared.spec
    _single_thread()
    # A pinned number not held at entry could later be filled by a weaker fd.
    missing = [fd for fd, _ in (*spec.fs_rules, *spec.fd_rules) if fd not in keep_fds]
    if missing:
        raise SandboxError(f"fs rule fds {missing} are not among the fds kept")
    report = Report(layers=[], landlock_abi=0, namespaces=[], seccomp="off", notify_fd=None,
                    groups=list(prepared.groups), dangerous=list(spec.dangerous), violation=spec.violation)
    _close_all_but([*keep_fds, *([] if net_fd is None else [net_fd])])
    _pin_malloc_arenas()
    _pin_cpu_count()
    if prepared.compiled is not None:
        # The filter denies memfd_create: the wire's large values go into memfds made now (before
        # RLIMIT_FSIZE, which their size may exceed; the values written later are held to it as before).
        use_blob_region()

    report["rlimits"] = _rlimits.apply(spec.limits)  # RLIMIT_NPROC after the namespaces (_rlimits)
    report["layers"].append("rlimits")
    report["real_uid"] = _namespaces.own_real_uid()

    if spec.namespaces:
        # (the directories granted at spawn: their fds are moved into the empty root)
        entered = _namespaces.apply(net_fd, _directories([fd for fd, _ in spec.fs_rules]))
        report["namespaces"] = entered
        if entered:
            report["layers"].append("namespaces:" + ",".join(entered))
    elif net_fd is not None:
        os.close(net_fd)
    report["rlimits"].update(_rlimits.apply_processes(spec.limits, "user" in report["namespaces"]))

    try:
        _caps.drop_all()
    except OSError as exc:
        raise SandboxError(str(exc)) from exc
    report["layers"].append("capabilities")

    prctl(PR_SET_NO_NEW_PRIVS, 1)
    report["layers"].append("no_new_privs")

    applied = _landlock.apply(spec.fs_rules, spec.landlock_min_abi) if spec.landlock else None
    if applied is not None:
        report["landlock_abi"] = applied.abi
        report["fs_rules"] = [list(r) for r in applied.rules]
        report["layers"].append(f"landlock:abi{applied.abi}")
    elif GROUPS_NEED_LANDLOCK.intersection(prepared.groups):
        raise SandboxError("syscall group @fs-at needs Landlock, which this kernel lacks")

    if prepared.compiled is not None:
        mode, fd = _load_seccomp(prepared)
        report["seccomp"] = mode
        report["notify_fd"] = fd
        report["seccomp_insns"] = prepared.compiled.length
        report["layers"].append(f"seccomp:{mode}")
    report["entry_us"] = int((time.perf_counter() - t0) * 1e6)
    return report


def _load_seccomp(prepared: Prepared) -> tuple[str, int | None]:
    assert prepared.compiled is not None
    pid = os.getpid()
    violation = prepared.spec.violation
    if prepared.notify:
        code = _seccomp.instantiate(prepared.compiled, pid, _seccomp.RET_USER_NOTIF)
        flags = _seccomp.FLAG_NEW_LISTENER
        if prepared.wait_killable:
            flags |= _seccomp.FLAG_WAIT_KILLABLE_RECV
        try:
            return "notify", _seccomp.load(code, flags)
        except OSError as exc:
            if exc.errno != errno.EBUSY:  # EBUSY: an outer filter already has the one listener allowed
                raise SandboxError(f"seccomp: {exc.strerror}") from exc
    code = _seccomp.instantiate(prepared.compiled, pid, _seccomp.default_action(violation, notify=False))
    try:
        _seccomp.load(code, 0)
    except OSError as exc:
        raise SandboxError(f"seccomp: {exc.strerror}") from exc
    return violation, None


def _enter_capsicum(prepared: Prepared, keep_fds: Sequence[int]) -> Report:
    """FreeBSD: limit every pinned fd to its rights, then cap_enter(2).
    Untested in CI (no FreeBSD runner); see docs/freebsd.md."""
    from protocol import Rights

    from . import _capsicum

    spec = prepared.spec
    for fd, rights in spec.fd_rules:
        if fd not in keep_fds:
            raise SandboxError(f"pinned fd {fd} is not among the fds kept")
        _capsicum.limit_fd(fd, Rights(rights))
    _capsicum.enter_capability_mode()
    return Report(layers=["capsicum"], landlock_abi=0, namespaces=[], seccomp="off", notify_fd=None,
                  groups=[], dangerous=list(spec.dangerous), violation=spec.violation)
