"""privsep ``Rights`` <-> FreeBSD Capsicum ``CAP_*`` values and ``cap_rights_t``.

Pure Python: importable and tested on every platform. The FreeBSD bindings in
:mod:`worker.sandbox._capsicum` use it to build the 16-byte ``cap_rights_t``
they hand to ``cap_rights_limit(2)``.

Source of every number: freebsd/freebsd-src ``sys/sys/capsicum.h`` @032c239e83ef
(values) and ``sys/kern/subr_capability.c`` @00d3456c7721 (validity rules),
as summarised in KERNEL-FACTS section 6.

Encoding (``CAP_RIGHTS_VERSION`` 0): ``struct cap_rights { uint64_t
cr_rights[2]; }``. Every right carries an index marker, ``CAPRIGHT(idx, bit) =
(1 << (57 + idx)) | bit``: bit 57 for element 0, bit 58 for element 1. Element
0 is ``CAP_NONE[0] | index-0 rights`` and element 1 is ``CAP_NONE[1] | index-1
rights``; the version lives in the top two bits of element 0 and is 0. An
index-1 right ORed into element 0 (or the reverse) makes the set invalid (the
kernel says EINVAL and libc's ``assert()`` aborts), so values are routed by
their marker and the result is checked with a port of
``cap_rights_is_valid()`` before it leaves this module.

Run ``python3 -m worker.sandbox._capsicum_rights`` to print the markdown
rights table that ``docs/freebsd.md`` carries.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from protocol import Rights

__all__ = [
    "CAP_FCNTL_ALL",
    "CAP_FCNTL_GETFL",
    "CAP_FCNTL_GETOWN",
    "CAP_FCNTL_SETFL",
    "CAP_FCNTL_SETOWN",
    "CAP_IOCTLS_ALL",
    "CAP_NONE",
    "CAP_RIGHTS_SIZE",
    "CAP_RIGHTS_VERSION",
    "FREEBSD_RIGHTS",
    "IOCTLS_MAX_COUNT",
    "cap_names",
    "cap_rights_contains",
    "cap_rights_is_valid",
    "decode_cap_rights",
    "decode_cap_words",
    "encode_cap_rights",
    "encode_cap_words",
    "fcntl_limit",
    "freebsd_effective_rights",
    "implied_rights",
    "ioctl_limit",
    "render_markdown_table",
    "to_cap_values",
]

# --------------------------------------------------------------------------
# sys/sys/capsicum.h @032c239e83ef
# --------------------------------------------------------------------------

CAP_RIGHTS_VERSION = 0  # CAP_RIGHTS_VERSION_00
CAP_RIGHTS_SIZE = 16  # sizeof(cap_rights_t) for version 0: two uint64_t
_U64 = (1 << 64) - 1
_MARKER_SHIFT = 57
_MARKER_MASK = 0x1F << _MARKER_SHIFT  # CAPIDXBIT field, bits 57..61
_VERSION_SHIFT = 62
_PAYLOAD_MASK = 0x01FFFFFFFFFFFFFF  # what cap_rights_clear removes: never the marker or version


def CAPRIGHT(idx: int, bit: int) -> int:
    """``CAPRIGHT(idx, bit) = (1ULL << (57 + idx)) | bit``."""
    return (1 << (_MARKER_SHIFT + idx)) | bit


def CAPIDXBIT(right: int) -> int:
    """``CAPIDXBIT(r) = (r >> 57) & 0x1F``: 1 for index 0, 2 for index 1."""
    return (right >> _MARKER_SHIFT) & 0x1F


def CAPRVER(right: int) -> int:
    """``CAPRVER(r) = r >> 62``."""
    return right >> _VERSION_SHIFT


# INDEX 0
CAP_READ = CAPRIGHT(0, 0x0000000000000001)
CAP_WRITE = CAPRIGHT(0, 0x0000000000000002)
CAP_SEEK_TELL = CAPRIGHT(0, 0x0000000000000004)
CAP_SEEK = CAP_SEEK_TELL | 0x0000000000000008
CAP_PREAD = CAP_SEEK | CAP_READ
CAP_PWRITE = CAP_SEEK | CAP_WRITE
CAP_MMAP = CAPRIGHT(0, 0x0000000000000010)
CAP_MMAP_R = CAP_MMAP | CAP_SEEK | CAP_READ
CAP_MMAP_W = CAP_MMAP | CAP_SEEK | CAP_WRITE
CAP_MMAP_X = CAP_MMAP | CAP_SEEK | 0x0000000000000020
CAP_MMAP_RW = CAP_MMAP_R | CAP_MMAP_W
CAP_MMAP_RX = CAP_MMAP_R | CAP_MMAP_X
CAP_MMAP_WX = CAP_MMAP_W | CAP_MMAP_X
CAP_MMAP_RWX = CAP_MMAP_R | CAP_MMAP_W | CAP_MMAP_X
CAP_CREATE = CAPRIGHT(0, 0x0000000000000040)
CAP_FEXECVE = CAPRIGHT(0, 0x0000000000000080)
CAP_FSYNC = CAPRIGHT(0, 0x0000000000000100)
CAP_FTRUNCATE = CAPRIGHT(0, 0x0000000000000200)
CAP_LOOKUP = CAPRIGHT(0, 0x0000000000000400)
CAP_FCHDIR = CAPRIGHT(0, 0x0000000000000800)
CAP_FCHFLAGS = CAPRIGHT(0, 0x0000000000001000)
CAP_CHFLAGSAT = CAP_FCHFLAGS | CAP_LOOKUP
CAP_FCHMOD = CAPRIGHT(0, 0x0000000000002000)
CAP_FCHMODAT = CAP_FCHMOD | CAP_LOOKUP
CAP_FCHOWN = CAPRIGHT(0, 0x0000000000004000)
CAP_FCHOWNAT = CAP_FCHOWN | CAP_LOOKUP
CAP_FCNTL = CAPRIGHT(0, 0x0000000000008000)
CAP_FLOCK = CAPRIGHT(0, 0x0000000000010000)
CAP_FPATHCONF = CAPRIGHT(0, 0x0000000000020000)
CAP_FSCK = CAPRIGHT(0, 0x0000000000040000)
CAP_FSTAT = CAPRIGHT(0, 0x0000000000080000)
CAP_FSTATAT = CAP_FSTAT | CAP_LOOKUP
CAP_FSTATFS = CAPRIGHT(0, 0x0000000000100000)
CAP_FUTIMES = CAPRIGHT(0, 0x0000000000200000)
CAP_FUTIMESAT = CAP_FUTIMES | CAP_LOOKUP
CAP_LINKAT_TARGET = CAP_LOOKUP | 0x0000000000400000
CAP_MKDIRAT = CAP_LOOKUP | 0x0000000000800000
CAP_MKFIFOAT = CAP_LOOKUP | 0x0000000001000000
CAP_MKNODAT = CAP_LOOKUP | 0x0000000002000000
CAP_RENAMEAT_SOURCE = CAP_LOOKUP | 0x0000000004000000
CAP_SYMLINKAT = CAP_LOOKUP | 0x0000000008000000
CAP_UNLINKAT = CAP_LOOKUP | 0x0000000010000000
CAP_ACCEPT = CAPRIGHT(0, 0x0000000020000000)
CAP_BIND = CAPRIGHT(0, 0x0000000040000000)
CAP_CONNECT = CAPRIGHT(0, 0x0000000080000000)
CAP_GETPEERNAME = CAPRIGHT(0, 0x0000000100000000)
CAP_GETSOCKNAME = CAPRIGHT(0, 0x0000000200000000)
CAP_GETSOCKOPT = CAPRIGHT(0, 0x0000000400000000)
CAP_LISTEN = CAPRIGHT(0, 0x0000000800000000)
CAP_PEELOFF = CAPRIGHT(0, 0x0000001000000000)
CAP_RECV = CAP_READ
CAP_SEND = CAP_WRITE
CAP_SETSOCKOPT = CAPRIGHT(0, 0x0000002000000000)
CAP_SHUTDOWN = CAPRIGHT(0, 0x0000004000000000)
CAP_BINDAT = CAP_LOOKUP | 0x0000008000000000
CAP_CONNECTAT = CAP_LOOKUP | 0x0000010000000000
CAP_LINKAT_SOURCE = CAP_LOOKUP | 0x0000020000000000
CAP_RENAMEAT_TARGET = CAP_LOOKUP | 0x0000040000000000
CAP_ALL0 = CAPRIGHT(0, 0x000007FFFFFFFFFF)

# INDEX 1
CAP_MAC_GET = CAPRIGHT(1, 0x0000000000000001)
CAP_MAC_SET = CAPRIGHT(1, 0x0000000000000002)
CAP_SEM_GETVALUE = CAPRIGHT(1, 0x0000000000000004)
CAP_SEM_POST = CAPRIGHT(1, 0x0000000000000008)
CAP_SEM_WAIT = CAPRIGHT(1, 0x0000000000000010)
CAP_EVENT = CAPRIGHT(1, 0x0000000000000020)
CAP_KQUEUE_EVENT = CAPRIGHT(1, 0x0000000000000040)
CAP_IOCTL = CAPRIGHT(1, 0x0000000000000080)
CAP_TTYHOOK = CAPRIGHT(1, 0x0000000000000100)
CAP_PDGETPID = CAPRIGHT(1, 0x0000000000000200)
CAP_PDWAIT = CAPRIGHT(1, 0x0000000000000400)
CAP_PDKILL = CAPRIGHT(1, 0x0000000000000800)
CAP_EXTATTR_DELETE = CAPRIGHT(1, 0x0000000000001000)
CAP_EXTATTR_GET = CAPRIGHT(1, 0x0000000000002000)
CAP_EXTATTR_LIST = CAPRIGHT(1, 0x0000000000004000)
CAP_EXTATTR_SET = CAPRIGHT(1, 0x0000000000008000)
CAP_ACL_CHECK = CAPRIGHT(1, 0x0000000000010000)
CAP_ACL_DELETE = CAPRIGHT(1, 0x0000000000020000)
CAP_ACL_GET = CAPRIGHT(1, 0x0000000000040000)
CAP_ACL_SET = CAPRIGHT(1, 0x0000000000080000)
CAP_KQUEUE_CHANGE = CAPRIGHT(1, 0x0000000000100000)
CAP_KQUEUE = CAP_KQUEUE_EVENT | CAP_KQUEUE_CHANGE
CAP_ALL1 = CAPRIGHT(1, 0x00000000001FFFFF)

# CAP_NONE(rights): {version 0 | CAPRIGHT(0, 0), CAPRIGHT(1, 0)}
CAP_NONE: tuple[int, int] = ((CAP_RIGHTS_VERSION << _VERSION_SHIFT) | CAPRIGHT(0, 0), CAPRIGHT(1, 0))
_CAP_ALL: tuple[int, int] = ((CAP_RIGHTS_VERSION << _VERSION_SHIFT) | CAP_ALL0, CAP_ALL1)

# fcntl limits: CAP_FCNTL_x = 1 << F_x, with FreeBSD's F_GETFL 3, F_SETFL 4,
# F_GETOWN 5, F_SETOWN 6 (not Linux's numbers).
CAP_FCNTL_GETFL = 1 << 3
CAP_FCNTL_SETFL = 1 << 4
CAP_FCNTL_GETOWN = 1 << 5
CAP_FCNTL_SETOWN = 1 << 6
CAP_FCNTL_ALL = CAP_FCNTL_GETFL | CAP_FCNTL_SETFL | CAP_FCNTL_GETOWN | CAP_FCNTL_SETOWN

# ioctl limits: cap_ioctls_get() returns CAP_IOCTLS_ALL (SSIZE_MAX) for an
# unrestricted fd; the kernel takes at most IOCTLS_MAX_COUNT commands
# (sys/kern/sys_capability.c).
CAP_IOCTLS_ALL = (1 << 63) - 1
IOCTLS_MAX_COUNT = 256
_ULONG_MAX = _U64  # cap_ioctl_t is unsigned long: 64 bits on every 64-bit FreeBSD

# The bit of CAP_MMAP_X that is neither CAP_MMAP nor CAP_SEEK. The header gives
# it no name of its own; privsep's private Rights._MMAP_X_BIT stands for it.
_CAP_MMAP_X_ONLY = CAPRIGHT(0, 0x0000000000000020)

# --------------------------------------------------------------------------
# The mapping. One entry per single-bit privsep right.
# --------------------------------------------------------------------------

# Each value is an OR of header constants of ONE index (checked at import).
# APPEND has no Capsicum right: it is O_APPEND set by the broker at open and
# kept by withholding F_SETFL (see fcntl_limit).
_PRIMITIVES: dict[Rights, int] = {
    Rights.READ: CAP_READ,
    Rights.WRITE: CAP_WRITE,
    Rights.SEEK: CAP_SEEK,
    Rights.MMAP: CAP_MMAP,
    Rights._MMAP_X_BIT: _CAP_MMAP_X_ONLY,
    Rights.FSTAT: CAP_FSTAT,
    Rights.FTRUNCATE: CAP_FTRUNCATE,
    Rights.FSYNC: CAP_FSYNC,
    Rights.LOOKUP: CAP_LOOKUP,
    Rights.CREATE: CAP_CREATE,
    Rights.UNLINKAT: CAP_UNLINKAT,
    Rights.FCHMOD: CAP_FCHMOD,
    Rights.FCHOWN: CAP_FCHOWN,
    Rights.FLOCK: CAP_FLOCK,
    Rights.IOCTL: CAP_IOCTL,
    Rights.FUTIMES: CAP_FUTIMES,
    Rights.FSTATFS: CAP_FSTATFS,
    Rights.FCNTL: CAP_FCNTL,
    Rights.MKDIRAT: CAP_MKDIRAT,
    Rights.RENAMEAT: CAP_RENAMEAT_SOURCE | CAP_RENAMEAT_TARGET,
    Rights.ACCEPT: CAP_ACCEPT,
    Rights.BIND: CAP_BIND,
    Rights.CONNECT: CAP_CONNECT,
    Rights.LISTEN: CAP_LISTEN,
    Rights.SHUTDOWN: CAP_SHUTDOWN,
    Rights.GETSOCKOPT: CAP_GETSOCKOPT,
    Rights.SETSOCKOPT: CAP_SETSOCKOPT,
    Rights.EVENT: CAP_EVENT,
}

# Rights that are enforced on FreeBSD without a CAP_* bit of their own.
_NOT_A_CAP_RIGHT = Rights.APPEND

_ENFORCEMENT: dict[str, str] = {
    "READ": "read(2), readv(2), getdents(2) on a directory, recv(2) on a socket; openat(O_RDONLY) beneath a "
    "directory fd. Checked by the kernel on every call.",
    "WRITE": "write(2), writev(2), send(2). Beneath a directory fd, openat(O_WRONLY) needs PWRITE "
    "(WRITE|SEEK) unless O_APPEND is given; WRITE alone opens only with O_APPEND.",
    "SEEK": "lseek(2) (includes CAP_SEEK_TELL). With READ/WRITE it forms CAP_PREAD/CAP_PWRITE.",
    "MMAP": "mmap(PROT_NONE) only; each PROT_ bit needs MMAP_R, MMAP_W or MMAP_X.",
    "MMAP_R": "mmap(PROT_READ); = MMAP|SEEK|READ. A mapping's maximum protection comes from the fd's rights, "
    "so mprotect(2) cannot raise it later.",
    "MMAP_W": "mmap(PROT_WRITE, MAP_SHARED); = MMAP|SEEK|WRITE. A MAP_PRIVATE writable mapping is "
    "copy-on-write and does not need it.",
    "MMAP_X": "mmap(PROT_EXEC); = MMAP|SEEK|0x20 (the 0x20 bit has no name of its own in the header).",
    "PREAD": "pread(2), preadv(2), aio_read(2); = SEEK|READ.",
    "PWRITE": "pwrite(2), pwritev(2), aio_write(2), openat(O_WRONLY) without O_APPEND; = SEEK|WRITE.",
    "FSTAT": "fstat(2). With LOOKUP on a directory fd it forms CAP_FSTATAT (fstatat(2), faccessat(2) beneath).",
    "FTRUNCATE": "ftruncate(2) and openat(O_TRUNC).",
    "FSYNC": "fsync(2), fdatasync(2), aio_fsync(2), openat(O_SYNC).",
    "LOOKUP": "the *at(2) calls relative to this directory fd. In capability mode: relative paths only, no "
    "absolute path, '..' only while it stays beneath; a file opened beneath inherits this fd's rights.",
    "CREATE": "openat(O_CREAT) beneath this directory fd (the lookup itself needs LOOKUP).",
    "UNLINKAT": "unlinkat(2), and renameat(2) onto an existing name. CAP_UNLINKAT includes CAP_LOOKUP, so the "
    "kernel grants LOOKUP with it.",
    "FCHMOD": "fchmod(2). With LOOKUP it forms CAP_FCHMODAT (fchmodat(2) beneath).",
    "FCHOWN": "fchown(2). With LOOKUP it forms CAP_FCHOWNAT (fchownat(2) beneath).",
    "FLOCK": "flock(2), fcntl(F_SETLK/F_SETLKW/F_GETLK), openat(O_SHLOCK/O_EXLOCK).",
    "IOCTL": "ioctl(2) (an index-1 right), narrowed by cap_ioctls_limit(2) to the grant's allow-list; an empty "
    "list allows none. Without IOCTL every ioctl is ENOTCAPABLE.",
    "FUTIMES": "futimes(2), futimens(2). With LOOKUP it forms CAP_FUTIMESAT (utimensat(2) beneath).",
    "FSTATFS": "fstatfs(2).",
    "FCNTL": "fcntl(F_GETFL/F_SETFL/F_GETOWN/F_SETOWN), narrowed by cap_fcntls_limit(2) to GETFL|SETFL|GETOWN: "
    "F_SETOWN is never granted, F_SETFL is withheld when the grant has APPEND. F_GETFD/F_SETFD/F_DUPFD need "
    "no right.",
    "MKDIRAT": "mkdirat(2) beneath this directory fd. CAP_MKDIRAT includes CAP_LOOKUP.",
    "RENAMEAT": "renameat(2) with this fd as source and target directory (CAP_RENAMEAT_SOURCE|"
    "CAP_RENAMEAT_TARGET, both include CAP_LOOKUP). Replacing an existing name also needs UNLINKAT.",
    "APPEND": "no CAP_ right: the broker opens the file with O_APPEND, so every write lands at end of file; "
    "the worker cannot clear O_APPEND because F_SETFL is withheld (no FCNTL, or FCNTL without "
    "CAP_FCNTL_SETFL). limit_fd refuses APPEND on an fd without O_APPEND.",
    "ACCEPT": "accept(2), accept4(2).",
    "BIND": "bind(2)/bindat(2) on this socket. In capability mode bind(2) itself is ECAPMODE; only bindat(2) "
    "relative to a directory fd holding CAP_BINDAT, which privsep does not grant.",
    "CONNECT": "connect(2)/connectat(2) on this socket. In capability mode connect(2) itself is ECAPMODE; "
    "only connectat(2) relative to a directory fd holding CAP_CONNECTAT, which privsep does not grant.",
    "LISTEN": "listen(2).",
    "SHUTDOWN": "shutdown(2).",
    "GETSOCKOPT": "getsockopt(2).",
    "SETSOCKOPT": "setsockopt(2).",
    "EVENT": "select(2), poll(2) and kevent(2) registration on this fd (an index-1 right).",
    "RECV": "alias of READ (CAP_RECV = CAP_READ).",
    "SEND": "alias of WRITE (CAP_SEND = CAP_WRITE).",
}


def _index_of(value: int) -> int:
    """Element (0 or 1) a CAP value belongs in; ValueError for a bad value."""
    if not 0 < value <= _U64:
        raise ValueError(f"CAP value {value:#x} is not a non-zero uint64")
    if CAPRVER(value) != 0:
        raise ValueError(f"CAP value {value:#x} carries version bits")
    marker = CAPIDXBIT(value)
    if marker == 1:
        return 0
    if marker == 2:
        return 1
    raise ValueError(f"CAP value {value:#x} does not carry exactly one index marker (CAPIDXBIT={marker:#x})")


def _check_unknown(rights: Rights) -> Rights:
    rights = Rights(rights)
    unknown = int(rights) & ~int(Rights.all())
    if unknown:
        raise ValueError(f"rights value {int(rights):#x} has bits privsep does not know: {unknown:#x}")
    return rights


def to_cap_values(rights: Rights) -> list[int]:
    """The FreeBSD ``CAP_*`` values that together express ``rights``.

    One value per privsep right held (``RENAMEAT`` gives both renameat
    rights), in privsep's bit order, without duplicates. Each value belongs to
    exactly one index, so every one of them is safe to pass to
    ``__cap_rights_init``. ``APPEND`` contributes nothing (it is O_APPEND, not a
    Capsicum right); unknown bits raise ``ValueError``.
    """
    rights = _check_unknown(rights)
    out: list[int] = []
    for member, value in _PRIMITIVES.items():
        if member in rights:
            parts = [value] if member is not Rights.RENAMEAT else [CAP_RENAMEAT_SOURCE, CAP_RENAMEAT_TARGET]
            for part in parts:
                if part not in out:
                    out.append(part)
    return out


def encode_cap_words(rights: Rights) -> tuple[int, int]:
    """``cr_rights[0]`` and ``cr_rights[1]`` for ``rights`` (version 0)."""
    words = list(CAP_NONE)
    for value in to_cap_values(rights):
        words[_index_of(value)] |= value
    w0, w1 = words
    if not cap_rights_is_valid(w0, w1):  # cannot happen; fail closed if it ever does
        raise AssertionError(f"built an invalid cap_rights_t {w0:#018x} {w1:#018x}")
    return w0, w1


def encode_cap_rights(rights: Rights) -> bytes:
    """The 16-byte ``cap_rights_t`` for ``rights``, little-endian (amd64/arm64)."""
    return struct.pack("<QQ", *encode_cap_words(rights))


def cap_rights_is_valid(w0: int, w1: int) -> bool:
    """Port of ``cap_rights_is_valid()`` (sys/kern/subr_capability.c)."""
    words = (w0, w1)
    if any(not 0 <= w <= _U64 for w in words):
        return False
    if CAPRVER(w0) != CAP_RIGHTS_VERSION:
        return False
    # CAPARSIZE = version + 2 = 2 == CAPARSIZE_MIN == CAPARSIZE_MAX
    if not cap_rights_contains(_CAP_ALL, words):
        return False
    bit2idx = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4}
    for i, w in enumerate(words):
        if bit2idx.get(CAPIDXBIT(w), -1) != i:
            return False
        if i > 0 and CAPRVER(w) != 0:
            return False
    return True


def cap_rights_contains(big: tuple[int, int], little: tuple[int, int]) -> bool:
    """``cap_rights_contains()``: every bit of ``little`` is in ``big``.

    This is the kernel's test for ``cap_rights_limit``: a new set that is not
    contained in the current one fails with ENOTCAPABLE.
    """
    return all((b & s) == s for b, s in zip(big, little, strict=True))


def decode_cap_words(w0: int, w1: int, *, strict: bool = False) -> Rights:
    """The privsep rights a ``cap_rights_t`` grants.

    A right is present when every bit of its CAP value is set, which is how
    the kernel checks it. With ``strict``, bits that no privsep right accounts
    for (``CAP_FCHDIR``, ``CAP_SEEK_TELL`` alone, ...) raise ``ValueError``;
    otherwise they are ignored. An invalid set always raises ``ValueError``.
    """
    if not cap_rights_is_valid(w0, w1):
        raise ValueError(f"invalid cap_rights_t {w0:#018x} {w1:#018x}")
    words = (w0, w1)
    out = Rights.NONE
    covered = [0, 0]
    for member, value in _PRIMITIVES.items():
        idx = _index_of(value)
        if words[idx] & value == value:
            out |= member
            covered[idx] |= value
    if strict:
        left = [(words[i] & ~covered[i]) & _PAYLOAD_MASK for i in (0, 1)]
        if any(left):
            names = [n for n, v in _HEADER_PRIMITIVES.items() if left[_index_of(v)] & v & _PAYLOAD_MASK]
            raise ValueError(
                f"cap_rights_t holds rights privsep does not map: {', '.join(names) or '?'} "
                f"(element 0 {left[0]:#x}, element 1 {left[1]:#x})"
            )
    return out


def decode_cap_rights(raw: bytes, *, strict: bool = False) -> Rights:
    """Inverse of :func:`encode_cap_rights` for the rights privsep maps."""
    if len(raw) != CAP_RIGHTS_SIZE:
        raise ValueError(f"cap_rights_t is {CAP_RIGHTS_SIZE} bytes, got {len(raw)}")
    w0, w1 = struct.unpack("<QQ", raw)
    return decode_cap_words(w0, w1, strict=strict)


def freebsd_effective_rights(rights: Rights) -> Rights:
    """What a FreeBSD fd limited to ``rights`` can actually do, as ``Rights``.

    Equal to ``rights`` except that Capsicum's composite ``*AT`` rights also
    grant ``LOOKUP`` (``UNLINKAT``, ``MKDIRAT``, ``RENAMEAT``), and ``APPEND``
    is left out because it is not a Capsicum right (it is ``O_APPEND``).
    """
    return decode_cap_words(*encode_cap_words(rights))


def implied_rights(rights: Rights) -> Rights:
    """Rights FreeBSD grants beyond ``rights`` (today: ``LOOKUP`` from an ``*AT`` right)."""
    return freebsd_effective_rights(rights) & ~Rights(rights)


# --------------------------------------------------------------------------
# ioctl and fcntl limits
# --------------------------------------------------------------------------

# fcntl commands a grant with FCNTL gets. F_SETOWN is left out: it points
# SIGIO/SIGURG at another process or group, which a worker must not reach.
_FCNTL_DEFAULT = CAP_FCNTL_GETFL | CAP_FCNTL_SETFL | CAP_FCNTL_GETOWN


def fcntl_limit(rights: Rights) -> int:
    """The ``cap_fcntls_limit(2)`` mask for ``rights``.

    0 without ``FCNTL`` (the kernel clears the mask anyway when CAP_FCNTL is
    absent). With ``FCNTL``: GETFL|SETFL|GETOWN, minus SETFL when the grant has
    ``APPEND`` so the worker cannot clear O_APPEND. SETOWN is never granted.
    """
    rights = _check_unknown(rights)
    if Rights.FCNTL not in rights:
        return 0
    mask = _FCNTL_DEFAULT
    if Rights.APPEND in rights:
        mask &= ~CAP_FCNTL_SETFL
    return mask


def ioctl_limit(rights: Rights, allowed: Iterable[int] | None = None) -> list[int] | None:
    """The ``cap_ioctls_limit(2)`` list for ``rights``.

    * no ``IOCTL``: ``[]`` -- no ioctl at all (CAP_IOCTL is absent too).
    * ``IOCTL`` and ``allowed`` given: those commands, sorted and unique; an
      empty list keeps CAP_IOCTL but allows no command.
    * ``IOCTL`` and ``allowed is None``: ``None``, meaning "do not call
      cap_ioctls_limit": every ioctl (CAP_IOCTLS_ALL), as Linux's Landlock
      IOCTL_DEV right is all-or-nothing too.

    Each command must fit ``cap_ioctl_t`` (unsigned long); at most 256.
    """
    rights = _check_unknown(rights)
    if Rights.IOCTL not in rights:
        return []
    if allowed is None:
        return None
    cmds: set[int] = set()
    for cmd in allowed:
        if isinstance(cmd, bool) or not isinstance(cmd, int) or not 0 <= cmd <= _ULONG_MAX:
            raise ValueError(f"ioctl command {cmd!r} does not fit cap_ioctl_t (unsigned long)")
        cmds.add(cmd)
    if len(cmds) > IOCTLS_MAX_COUNT:
        raise ValueError(f"{len(cmds)} ioctl commands; FreeBSD takes at most {IOCTLS_MAX_COUNT}")
    return sorted(cmds)


# --------------------------------------------------------------------------
# The table the docs render
# --------------------------------------------------------------------------


def _table_names() -> list[str]:
    return [n for n in Rights.__members__ if n != "NONE" and not n.startswith("_")]


def _or_values(rights: Rights) -> int:
    value = 0
    for v in to_cap_values(rights):
        value |= v
    return value


FREEBSD_RIGHTS: dict[str, tuple[int, str]] = {
    name: (_or_values(Rights[name]), _ENFORCEMENT[name]) for name in _table_names()
}
"""privsep right name -> (FreeBSD CAP value, how FreeBSD enforces it).

The value is the OR of the right's ``CAP_*`` constants (index marker
included); 0 means the right has no Capsicum bit (``APPEND``).
"""

# Every CAP_* right the header defines (not the fcntl/ioctl limits, not CAP_ALL).
_HEADER_RIGHTS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith("CAP_")
    and isinstance(value, int)
    and name not in ("CAP_ALL0", "CAP_ALL1", "CAP_RIGHTS_VERSION", "CAP_RIGHTS_SIZE", "CAP_IOCTLS_ALL")
    and not name.startswith("CAP_FCNTL_")
}
# Those that are one primitive bit (plus marker): used to name unmapped bits.
_HEADER_PRIMITIVES: dict[str, int] = {
    name: value
    for name, value in _HEADER_RIGHTS.items()
    if name not in ("CAP_RECV", "CAP_SEND") and bin(value & _PAYLOAD_MASK).count("1") == 1
}


def cap_names(name: str) -> str:
    """The header constant(s) behind privsep right ``name``, e.g. ``CAP_MMAP_R``."""
    value = FREEBSD_RIGHTS[name][0]
    if value == 0:
        return "none"
    if _HEADER_RIGHTS.get(f"CAP_{name}") == value:
        return f"CAP_{name}"
    by_value = {v: n for n, v in reversed(_HEADER_RIGHTS.items())}
    return " | ".join(by_value[v] for v in to_cap_values(Rights[name]))


def render_markdown_table() -> str:
    """The FreeBSD column of the rights table, as markdown, from FREEBSD_RIGHTS."""
    lines = [
        "| privsep right | FreeBSD CAP_* | value (with index marker) | how FreeBSD enforces it |",
        "|---|---|---|---|",
    ]
    for name, (value, how) in FREEBSD_RIGHTS.items():
        shown = f"`{value:#018x}`" if value else "-"
        names = cap_names(name).replace(" | ", " \\| ")
        lines.append(f"| `{name}` | {names} | {shown} | {how.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def _self_check() -> None:
    for member, value in _PRIMITIVES.items():
        _index_of(value)  # exactly one marker, version 0
        if bin(int(member)).count("1") != 1:
            raise AssertionError(f"{member!r} is not a single privsep bit")
    mapped = Rights.NONE
    for member in _PRIMITIVES:
        mapped |= member
    missing = [m.name for m in Rights if m not in mapped and m not in _NOT_A_CAP_RIGHT]
    if missing:
        raise AssertionError(f"privsep rights without a FreeBSD mapping: {missing}")
    if set(_ENFORCEMENT) != set(_table_names()):
        raise AssertionError("every privsep right needs a FreeBSD enforcement note")


_self_check()


if __name__ == "__main__":
    print(render_markdown_table(), end="")
