"""New namespaces at entry, where the kernel allows them. Private.

One ``unshare(USER|NET|IPC|UTS|NS)`` (or, with a network namespace made
ahead of time by :func:`fresh_net`, ``setns`` into it and one unshare of the
rest), then the worker's uid/gid are
mapped to themselves so files it creates through held directory fds keep a
valid owner, then the filesystem root becomes an empty, read-only, 4 KiB tmpfs
inside the private mount namespace: absolute paths, including absolute paths
given to ``openat`` on a held fd, resolve into nothing.

The empty root is entered with ``chroot`` rather than ``pivot_root``: both give
the same empty "/" to path lookups, and ``pivot_root`` + lazy unmount costs
~1.4 ms against ~0.1 ms. ``chroot``'s classic escapes need ``chroot``,
``fchdir`` or ``mount`` again, all denied by seccomp.

Failure of any step is not fatal: the layer is skipped and reported.
"""

from __future__ import annotations

import os
import resource

from ._libc import ffi, lib

ffi.cdef(
    """
    int unshare(int flags);
    int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const void *data);
    int chroot(const char *path);
    int chdir(const char *path);
    int setns(int fd, int nstype);
    """
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_ORDER = [("user", CLONE_NEWUSER), ("net", CLONE_NEWNET), ("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS),
          ("mount", CLONE_NEWNS)]
ALL = sum(flag for _, flag in _ORDER)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
_MOUNTPOINTS = (b"/tmp", b"/mnt", b"/dev", b"/proc")


def _unshare(flags: int) -> bool:
    return int(lib.unshare(flags)) == 0


#: A worker's real uid is REAL_UID_BASE + its pid (unique among live processes), far above the
#: ranges that systems and containers hand out (subuids, systemd's dynamic users).
REAL_UID_BASE = 0xFF000000
#: The RLIMIT_NPROC a worker needs when it makes its user namespace with a real uid of its own:
#: the kernel then caps all of root's tasks at that value (below). Default limits are
#: max_threads / 2, tens of thousands; a service's LimitNPROC= may be far lower.
NPROC_NEEDED = 10_000


def own_real_uid() -> int | None:
    """Give this process a real uid of its own, keeping its effective,
    saved and filesystem uid (so its capabilities until they are dropped, and
    the files it may open, are unchanged). The kernel counts some things per
    real uid: the fds sent over Unix sockets and not yet received (each sender
    is held to its RLIMIT_NOFILE against that count), and the processes that
    RLIMIT_NPROC bounds. With every worker the broker's uid, one worker that
    parked ~500 fds in flight made every other worker's sending of an fd fail
    (ETOOMANYREFS), spawns included; and RLIMIT_NPROC never bound a root
    worker. Needs root (CAP_SETUID); returns the uid, or None where it cannot.

    Without uid 0 the worker also loses the kernel's exemption of root from
    RLIMIT_NPROC, and the user namespace it makes next caps its owner, all of
    root's tasks on the host, at the RLIMIT_NPROC it has then: its soft limit
    is raised to the hard one first (entry lowers it to ``Limits.processes``
    once the namespace is made), and where even that is below NPROC_NEEDED
    the worker keeps the broker's uid (a round-14 red-team run: under
    ``LimitNPROC=110`` no worker could start a thread)."""
    if os.geteuid() != 0:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if hard != resource.RLIM_INFINITY and hard < NPROC_NEEDED:
        return None
    resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))
    uid = REAL_UID_BASE + os.getpid()
    try:
        os.setresuid(uid, -1, -1)
    except OSError:
        return None
    return uid


def write_file(path: str, data: str) -> None:
    """One write(2) of ``data``: control files (uid_map, cgroup knobs) take a value per write."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _map_ids(uid: int, gid: int) -> None:
    write_file("/proc/self/setgroups", "deny")
    write_file("/proc/self/uid_map", f"{uid} {uid} 1")
    write_file("/proc/self/gid_map", f"{gid} {gid} 1")


def _empty_root(own_userns: bool) -> bool:
    # In a new user namespace the copied mounts are already slaves of the
    # host's; without one (privileged fallback) stop propagation explicitly.
    if not own_userns and int(lib.mount(ffi.NULL, b"/", ffi.NULL, MS_REC | MS_PRIVATE, ffi.NULL)) != 0:
        return False
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    for target in _MOUNTPOINTS:
        if int(lib.mount(b"privsep-empty", target, b"tmpfs", flags, b"size=4k,nr_inodes=2,mode=0555")) == 0:
            break
    else:
        return False
    return int(lib.chdir(target)) == 0 and int(lib.chroot(b".")) == 0 and int(lib.chdir(b"/")) == 0


def fresh_net() -> int | None:
    """Create a new, empty network namespace without staying in it; return an
    fd to it (O_CLOEXEC), or None where this process may not create one.

    Creating a network namespace is most of the cost of entering namespaces
    (~0.35 ms here against ~0.06 ms for user, ipc, uts and mount together), so
    the zygote makes one per spare ahead of time and the worker joins it with
    ``setns`` at entry: still a namespace of its own, created off the
    critical path. Needs CAP_SYS_ADMIN (a root broker); without it, entry
    unshares the network namespace itself."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not _unshare(CLONE_NEWNET):
            return None
        fresh = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if int(lib.setns(here, CLONE_NEWNET)) != 0:  # cannot happen after a privileged unshare
            os.close(fresh)
            raise OSError(ffi.errno, "setns back to the original network namespace failed")
        return fresh
    finally:
        os.close(here)


def apply(net_fd: int | None = None) -> list[str]:
    """Enter what namespaces the kernel allows. Returns the names entered
    (``user``, ``net``, ``ipc``, ``uts``, ``mount``, ``emptyroot``).

    ``net_fd``: a fresh network namespace from :func:`fresh_net`, joined
    instead of creating one (closed here either way)."""
    uid, gid = os.geteuid(), os.getegid()
    entered: list[str] = []
    want = ALL
    if net_fd is not None:
        try:
            if int(lib.setns(net_fd, CLONE_NEWNET)) == 0:
                want &= ~CLONE_NEWNET
                entered.append("net")
        finally:
            os.close(net_fd)
    if _unshare(want):
        entered = [name for name, flag in _ORDER if flag & want or name in entered]
    elif _unshare(want & ~CLONE_NEWUSER):  # privileged without user namespaces
        entered = [name for name, flag in _ORDER if (flag & want and name != "user") or name in entered]
    else:
        for name, flag in _ORDER:
            if flag & want and _unshare(flag):
                entered.append(name)
        entered = [name for name, _ in _ORDER if name in entered]
    if "user" in entered:
        try:
            _map_ids(uid, gid)
        except OSError:
            pass  # unmapped ids: files cannot be created beneath grants, nothing weaker
    if "mount" in entered and _empty_root("user" in entered):
        entered.append("emptyroot")
    return entered


def warm() -> None:
    """Resolve the libc functions ``apply`` calls (without calling them)."""
    for name in ("unshare", "mount", "chroot", "chdir", "setns"):
        getattr(lib, name)
