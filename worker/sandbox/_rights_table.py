"""How each right is enforced: the one source of truth for code and docs.

For every right: how FreeBSD enforces it, and how Linux enforces it for a
grant made at spawn (its fd is held at sandbox entry and pinned to its
number) and for one made later (the fd arrives after entry). The broker's
refusal logic (:func:`later_file_plan`) and the README table are both built
from :data:`TABLE`; a test checks that they agree with what the kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import Rights, UnsupportedRights

from ._capsicum_rights import FREEBSD_RIGHTS, cap_names

KERNEL = "kernel"
LANDLOCK = "kernel (Landlock)"
FILTER = "seccomp filter"
SUBSTITUTE = "broker substitute"
BROKER = "broker"
REFUSED = "refused"


@dataclass(frozen=True)
class Enforcement:
    right: str
    at_spawn: str  # mechanism for a grant held at entry
    at_spawn_strength: str
    later: str  # mechanism for a grant made after entry
    later_strength: str

    @property
    def freebsd_short(self) -> str:
        names = cap_names(self.right)
        if names == "none":
            return "O_APPEND at open, F_SETFL withheld"
        if self.right == "IOCTL":
            return f"{names} + cap_ioctls_limit"
        if self.right == "FCNTL":
            return f"{names} + cap_fcntls_limit"
        return names

    @property
    def freebsd(self) -> str:
        return FREEBSD_RIGHTS[self.right][1]


_PIN = "fd number pinned at entry; the filter allows the syscall on it only with this right"
TABLE: tuple[Enforcement, ...] = (
    Enforcement("READ", "access mode fixed at open (O_RDONLY/O_RDWR)", KERNEL, "same", KERNEL),
    Enforcement("WRITE", "access mode fixed at open (O_WRONLY/O_RDWR)", KERNEL, "same", KERNEL),
    Enforcement("APPEND", "O_APPEND at open; F_SETFL without O_APPEND is denied for every fd", FILTER, "same", FILTER),
    Enforcement("SEEK", f"lseek/pread/pwrite: {_PIN}", FILTER,
                "without SEEK the worker gets a pipe fed by the broker (ESPIPE)", SUBSTITUTE),
    Enforcement("FSTAT", f"fstat/statx(AT_EMPTY_PATH): {_PIN}", FILTER,
                "without FSTAT the worker gets a pipe (fstat shows a pipe, not the file)", SUBSTITUTE),
    Enforcement("FTRUNCATE", f"ftruncate/fallocate: {_PIN}", FILTER,
                "writable files are opened by a Landlock-restricted opener without TRUNCATE (EACCES); fallocate "
                "on every later fd: plain preallocation only (mode 0, held to Limits.file_size; the filter)",
                LANDLOCK),
    Enforcement("FSYNC", f"fsync/fdatasync: {_PIN}", FILTER, "denied for every later fd; asking for it is refused",
                REFUSED),
    Enforcement("MMAP_R", f"file-backed mmap: {_PIN}", FILTER,
                "file-backed mmap denied for every later fd; asking for it is refused", REFUSED),
    Enforcement("MMAP_W", "as MMAP_R, plus MAP_SHARED|PROT_WRITE needs a writable fd", FILTER, "refused", REFUSED),
    Enforcement("MMAP_X", "PROT_EXEC is denied unless the policy names allow-exec-mappings", FILTER, "refused",
                REFUSED),
    Enforcement("FCHMOD", f"fchmod: {_PIN}", FILTER, "denied for every later fd; asking is refused", REFUSED),
    Enforcement("FCHOWN", f"fchown: {_PIN}", FILTER, "denied for every later fd; asking is refused", REFUSED),
    Enforcement("FLOCK", f"flock: {_PIN}", FILTER, "denied for every later fd; asking is refused", REFUSED),
    Enforcement("FUTIMES", f"utimensat(fd, NULL): {_PIN}", FILTER, "denied for every later fd; asking is refused",
                REFUSED),
    Enforcement("FSTATFS", f"fstatfs: {_PIN}", FILTER, "denied for every later fd; asking is refused", REFUSED),
    Enforcement("FCNTL", f"F_SETFL (never clearing O_APPEND): {_PIN}", FILTER,
                "F_SETFL for every later fd only with O_APPEND among the new flags and nothing but O_NONBLOCK "
                "besides (status flags are the open file's, which the broker's capability shares; CPython sets "
                "O_NONBLOCK with ioctl(FIONBIO), which is allowed); asking is refused", REFUSED),
    Enforcement("IOCTL", f"any ioctl but TIOCSTI/TIOCLINUX: {_PIN}; device ioctls also need Landlock IOCTL_DEV",
                FILTER, "only the harmless allowlist (FIONREAD, FIOCLEX, ...) for every fd; asking is refused",
                REFUSED),
    Enforcement("LOOKUP", "directory fd held at entry becomes a Landlock rule; openat beneath it (no AT_FDCWD)",
                LANDLOCK, "directory proxy: every lookup is a request the broker resolves with openat2", BROKER),
    Enforcement("CREATE", "Landlock MAKE_REG on the directory rule", LANDLOCK, "directory proxy (broker)", BROKER),
    Enforcement("UNLINKAT", "Landlock REMOVE_FILE/REMOVE_DIR on the directory rule", LANDLOCK,
                "directory proxy (broker)", BROKER),
    Enforcement("MKDIRAT", "Landlock MAKE_DIR on the directory rule", LANDLOCK, "directory proxy (broker)", BROKER),
    Enforcement("RENAMEAT", "Landlock REFER on the directory rule", LANDLOCK, "directory proxy (broker)", BROKER),
)  # fmt: skip

BY_NAME = {e.right: e for e in TABLE}

# Rights a file grant made after entry cannot carry on Linux (their syscalls
# are denied for every fd not pinned at entry).
LATER_UNGRANTABLE = (
    Rights.FSYNC | Rights.MMAP | Rights._MMAP_X_BIT | Rights.FCHMOD | Rights.FCHOWN | Rights.FLOCK
    | Rights.FUTIMES | Rights.FSTATFS | Rights.FCNTL | Rights.IOCTL
)  # fmt: skip
SOCKET_RIGHTS = (
    Rights.ACCEPT | Rights.BIND | Rights.CONNECT | Rights.LISTEN | Rights.SHUTDOWN | Rights.GETSOCKOPT
    | Rights.SETSOCKOPT | Rights.EVENT
)  # fmt: skip
DIR_RIGHTS = Rights.LOOKUP | Rights.CREATE | Rights.UNLINKAT | Rights.MKDIRAT | Rights.RENAMEAT

# How a later file grant is delivered.
PLAIN = "fd"  # the file itself
NO_TRUNCATE = "fd-no-truncate"  # the file, opened by the Landlock-restricted opener
PIPE_READ = "pipe-read"  # a pipe the broker fills from the file
PIPE_WRITE = "pipe-write"  # a pipe the broker drains into the file


def later_file_plan(rights: Rights, *, landlock_abi: int, accept_weaker: Rights = Rights.NONE) -> tuple[str, Rights]:
    """How to hand a worker a file with ``rights`` after sandbox entry.

    Returns (delivery, rights actually carried). Raises UnsupportedRights
    with the reason when Linux cannot enforce the set, unless every right at
    fault is in ``accept_weaker`` (the policy's named acceptance).
    """
    rights = Rights(rights)
    if rights & SOCKET_RIGHTS:
        raise UnsupportedRights(f"{Rights(rights & SOCKET_RIGHTS).describe()} apply to sockets, not files")
    if rights & DIR_RIGHTS:
        raise UnsupportedRights(f"{Rights(rights & DIR_RIGHTS).describe()} need a directory grant")
    missing = rights & LATER_UNGRANTABLE
    if missing:
        if missing & ~accept_weaker:
            raise UnsupportedRights(
                f"{Rights(missing).describe()} cannot be granted on an fd passed after sandbox entry on Linux "
                "(pass the file at spawn, or accept the weaker grant with Policy.accept_weaker)"
            )
        rights &= ~missing
    reads = bool(rights & Rights.READ)
    writes = bool(rights & (Rights.WRITE | Rights.APPEND))
    if not reads and not writes:
        raise UnsupportedRights("a file grant needs READ, WRITE or APPEND")
    seek, fstat = bool(rights & Rights.SEEK), bool(rights & Rights.FSTAT)
    if seek and fstat:
        if writes and not rights & Rights.FTRUNCATE:
            if landlock_abi >= 3:
                return NO_TRUNCATE, rights
            if not accept_weaker & Rights.FTRUNCATE:
                raise UnsupportedRights(
                    "writable without FTRUNCATE needs Landlock ABI 3 (truncate control); this kernel has "
                    f"{landlock_abi or 'none'}"
                )
        return PLAIN, rights
    if seek and not fstat and not accept_weaker & Rights.FSTAT:
        raise UnsupportedRights("SEEK without FSTAT cannot be enforced on a later fd on Linux; ask for FSTAT too")
    if seek:
        return PLAIN if not writes or rights & Rights.FTRUNCATE else NO_TRUNCATE, rights
    # No SEEK: a pipe, one direction.
    if reads and writes:
        raise UnsupportedRights("READ and WRITE without SEEK: a pipe carries one direction; ask for SEEK|FSTAT")
    if fstat and not accept_weaker & Rights.FSTAT:
        raise UnsupportedRights("FSTAT without SEEK: the worker would get a pipe, whose fstat is not the file's")
    if rights & Rights.FTRUNCATE:
        raise UnsupportedRights("FTRUNCATE without SEEK|FSTAT: a pipe cannot be truncated")
    return (PIPE_READ if reads else PIPE_WRITE), rights & ~Rights.FSTAT


def spawn_dir_check(rights: Rights, accept_weaker: Rights = Rights.NONE) -> None:
    """A directory granted at spawn becomes a Landlock rule, and the worker
    opens files beneath it itself. Those files are not pinned, so the
    filter allows SEEK and FSTAT on them and denies the LATER_UNGRANTABLE
    set: a directory grant must say so, or be refused."""
    rights = Rights(rights)
    if rights & SOCKET_RIGHTS:
        raise UnsupportedRights(f"{Rights(rights & SOCKET_RIGHTS).describe()} apply to sockets, not directories")
    weak = Rights(rights & LATER_UNGRANTABLE & ~accept_weaker)
    if weak:
        raise UnsupportedRights(
            f"{weak.describe()} cannot be granted on files opened beneath a directory grant on Linux"
        )
    lacking = Rights((Rights.SEEK | Rights.FSTAT) & ~rights & ~accept_weaker)
    if rights & (Rights.READ | Rights.WRITE) and lacking:
        raise UnsupportedRights(
            f"files opened beneath a directory grant always allow {lacking.describe()} on Linux; "
            "add them to the grant or accept the weaker grant with Policy.accept_weaker"
        )


def render_markdown() -> str:
    """The rights table for the README."""
    lines = [
        "| right | FreeBSD (cap_rights_limit, kernel) | Linux, grant held at spawn | strength "
        "| Linux, grant made later | strength |",
        "|---|---|---|---|---|---|",
    ]
    for e in TABLE:
        lines.append(
            f"| {e.right} | {e.freebsd_short} | {e.at_spawn} | {e.at_spawn_strength} | {e.later} | {e.later_strength} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown())
