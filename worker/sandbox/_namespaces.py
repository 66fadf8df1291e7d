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

Directories granted at spawn are held fds on the host's tree, outside that
root: ``..`` from one walked up to the host's ``/``, and stat is no Landlock
right, so a worker could stat any host path (a claims audit). Each is
put into the empty root before the chroot (one recursive copy of the
mounts per filesystem holding grants, at their deepest common directory,
so that a rename between two grants on one filesystem is not EXDEV) and
its fd reopened there: ``..`` from a grant now stops at that directory,
then at the empty root. The reopened fd must be the same directory as the
one granted (device, inode and mount flags), else the grant keeps its fd;
``grantroot`` is reported when every grant was moved.

Failure of any step is not fatal: the layer is skipped and reported.
"""

from __future__ import annotations

import fcntl
import os
import resource
from collections.abc import Sequence

from ._libc import ffi, lib, syscall
from ._openat2 import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, _how, openat2

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
MS_REMOUNT, MS_REC, MS_PRIVATE = 0x20, 0x4000, 1 << 18
# The new mount API (5.2+), numbered alike on every architecture
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
OPEN_TREE_CLONE, AT_RECURSIVE, MOVE_MOUNT_F_EMPTY_PATH = 1, 0x8000, 0x4
AT_FDCWD = -100
_MOUNTPOINTS = (b"/tmp", b"/mnt", b"/dev", b"/proc")
_NO_LINKS = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


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


def _grant_groups(dirs: Sequence[int]) -> tuple[list[tuple[str, list[tuple[int, str]]]], bool]:
    """The granted directories by the filesystem holding them: (their
    deepest common directory, [(fd, path)]); and whether every one is
    there (one whose place cannot be read, deleted or not reachable from
    this mount namespace, keeps its fd; the rest move all the same). (Two
    mounts of one filesystem share a group: its directory's mounts come
    along with it, and a rename between them is EXDEV, as on the host.)"""
    by_device: dict[int, list[tuple[int, str]]] = {}
    every = True
    for fd in dirs:
        try:
            path, st = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
        except OSError:
            every = False
            continue
        # (deleted: no link left; a name that merely ends in " (deleted)", which whoever names
        # the directory chooses, kept a grant on the host: red-team round 46)
        if not path.startswith("/") or st.st_nlink == 0:
            every = False
            continue
        by_device.setdefault(st.st_dev, []).append((fd, path))
    return [(os.path.commonpath([p for _, p in grants]), grants) for grants in by_device.values()], every


def _clone_tree(path: str) -> int:
    """A detached copy of the mounts at and beneath ``path`` (open_tree), or
    -1. Taken before the empty root is mounted: a copy made after, of /tmp
    or /, held the empty root itself where the grants were (red-team round
    45: no grant under /tmp moved)."""
    return syscall(SYS_OPEN_TREE, AT_FDCWD, ffi.new("char[]", os.fsencode(path)),
                   OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)


def _same_place(was: int, now: int) -> bool:
    """The same directory (device, inode), seen through mounts of the same
    flags: a writable mount of it stacked on the host over a read-only one
    would otherwise make a read-only grant writable (red-team round 45)."""
    a, b = os.fstat(was), os.fstat(now)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and os.fstatvfs(was).f_flag == os.fstatvfs(now).f_flag


def _rebase(groups: list[tuple[str, list[tuple[int, str]]]], attached: list[bool]) -> bool:
    """(In the empty root, just entered, where /0, /1, ... are the attached
    groups' trees.) Reopen each grant there, in its fd's place. False if any
    is not moved: that one keeps its fd."""
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    every = True
    try:
        for i, (top, grants) in enumerate(groups):
            if not attached[i]:
                every = False
                continue
            for fd, path in grants:
                rel = os.path.relpath(path, top)
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_PATH | os.O_NONBLOCK)
                try:
                    # (no symlink on the way: the host's tree may change under a spawn)
                    new = openat2(root, str(i) if rel == "." else f"{i}/{rel}",
                                  mode | os.O_DIRECTORY | os.O_CLOEXEC, resolve=_NO_LINKS)
                except OSError:
                    every = False
                    continue
                if _same_place(fd, new):
                    os.dup2(new, fd, inheritable=os.get_inheritable(fd))
                else:
                    every = False  # (renamed, replaced or remounted on the host since the broker opened it)
                os.close(new)
    finally:
        os.close(root)
    return every


def _empty_root(own_userns: bool, dirs: Sequence[int]) -> tuple[bool, bool]:
    """Enter the empty root: (entered, every grant in ``dirs`` moved into it)."""
    # In a new user namespace the copied mounts are already slaves of the
    # host's; without one (privileged fallback) stop propagation explicitly.
    if not own_userns and int(lib.mount(ffi.NULL, b"/", ffi.NULL, MS_REC | MS_PRIVATE, ffi.NULL)) != 0:
        return False, False
    groups, every = _grant_groups(dirs) if dirs else ([], False)
    trees = [_clone_tree(top) for top, _ in groups]
    try:
        return _enter_empty_root(groups, trees, every)
    finally:
        for fd in trees:
            if fd >= 0:
                os.close(fd)


def _enter_empty_root(groups: list[tuple[str, list[tuple[int, str]]]], trees: list[int], every: bool
                      ) -> tuple[bool, bool]:
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    # (writable until the mountpoints are made; one inode each, the root's, and one the kernel keeps)
    options = f"size=4k,nr_inodes={2 + len(groups)},mode=0555".encode()
    for target in _MOUNTPOINTS:
        if int(lib.mount(b"privsep-empty", target, b"tmpfs", flags & ~MS_RDONLY if groups else flags, options)) == 0:
            break
    else:
        return False, False
    attached = [False] * len(groups)
    for i, tree in enumerate(trees):
        point = target + b"/%d" % i
        try:
            os.mkdir(point, 0o555)
        except OSError:
            break
        if tree >= 0:
            attached[i] = syscall(SYS_MOVE_MOUNT, tree, ffi.new("char[]", b""), AT_FDCWD, ffi.new("char[]", point),
                                  MOVE_MOUNT_F_EMPTY_PATH) == 0
    if groups and int(lib.mount(ffi.NULL, target, ffi.NULL, MS_REMOUNT | flags, ffi.NULL)) != 0:
        return False, False  # (a writable root is no empty root)
    if not (int(lib.chdir(target)) == 0 and int(lib.chroot(b".")) == 0 and int(lib.chdir(b"/")) == 0):
        return False, False
    return True, bool(groups) and _rebase(groups, attached) and every


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


def apply(net_fd: int | None = None, dirs: Sequence[int] = ()) -> list[str]:
    """Enter what namespaces the kernel allows. Returns the names entered
    (``user``, ``net``, ``ipc``, ``uts``, ``mount``, ``emptyroot``, and
    ``grantroot`` when every directory fd in ``dirs`` was moved into it).

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
    if "mount" in entered:
        rooted, rebased = _empty_root("user" in entered, dirs)
        entered += ["emptyroot"] * rooted + ["grantroot"] * rebased
    return entered


def warm() -> None:
    """Resolve the libc functions ``apply`` calls (without calling them),
    and build the call interfaces of the grants' move (each failing: EBADF
    or ENOENT): their first use in a worker cost about 1.3 ms (cffi)."""
    for name in ("unshare", "mount", "chroot", "chdir", "setns"):
        getattr(lib, name)
    syscall(SYS_OPEN_TREE, -1, ffi.new("char[]", b""), 0)
    syscall(SYS_MOVE_MOUNT, -1, ffi.new("char[]", b""), -1, ffi.new("char[]", b""), 0)
    for access in (os.O_RDONLY, os.O_PATH):
        _how(access | os.O_DIRECTORY | os.O_CLOEXEC, 0, _NO_LINKS)
