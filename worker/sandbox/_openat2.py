"""openat2(2) through cffi. Private.

Resolution with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` never escapes the
tree rooted at the directory fd: ``..`` past the top, absolute paths,
symlinks that lead out and ``/proc`` magic links all fail in the kernel.
"""

from __future__ import annotations

import errno
import os
import platform
import sys

from ._libc import ffi, lib

ffi.cdef("struct open_how { uint64_t flags; uint64_t mode; uint64_t resolve; };")

SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
_MAX_EAGAIN = 16


_NR = ffi.cast("long", SYS_OPENAT2)
_HOW_SIZE = ffi.cast("long", ffi.sizeof("struct open_how"))
_HOW_SIZE_INT = ffi.sizeof("struct open_how")
# On 64-bit x86-64 and arm64 Linux, syscall()'s variadic integer arguments travel in the
# registers of a fixed-arity call (x86-64 adds only %al, an upper bound the callee may
# ignore). Called through a fixed prototype, cffi takes ints and bytes as they are and does
# not build a variadic call each time: about 2.5 us less per open, on every grant the broker
# resolves. (platform.machine() names the kernel's CPU: a 32-bit Python there takes the
# variadic call, as every other platform does.)
_FIXED = (
    ffi.cast("long (*)(long, long, char *, struct open_how *, long)", lib.syscall)
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") and sys.maxsize > 2**32
    else None
)
_LINUX = sys.platform == "linux"
_hows: dict[tuple[int, int, int], object] = {}  # read-only once made: shared by every call and thread


def _how(flags: int, mode: int, resolve: int) -> object:
    key = (flags, mode, resolve)
    how = _hows.get(key)
    if how is None:
        how = ffi.new("struct open_how *")
        how.flags = flags
        how.mode = mode
        how.resolve = resolve
        if len(_hows) < 64:
            _hows[key] = how
    return how


def openat2(
    dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
) -> int:
    """Open ``path`` relative to ``dirfd``. Returns a new fd the caller owns.

    Retries the bounded number of ``EAGAIN`` the kernel may give when a
    rename races a ``..`` walk; raises ``OSError`` otherwise.
    """
    if not _LINUX:  # (437 is another call's number elsewhere, or none)
        raise OSError(errno.ENOSYS, "openat2(2) is Linux's; this platform has no such call", path)
    how = _how(flags, mode, resolve)
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError("embedded null byte")  # as os.open says; C would cut the path there
    for _ in range(_MAX_EAGAIN):
        if _FIXED is not None:
            fd = int(_FIXED(SYS_OPENAT2, dirfd, raw, how, _HOW_SIZE_INT))
        else:
            fd = int(lib.syscall(_NR, ffi.cast("long", dirfd), ffi.new("char[]", raw), how, _HOW_SIZE))
        if fd >= 0:
            return fd
        err = ffi.errno
        if err != errno.EAGAIN and err != errno.EINTR:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, "openat2 kept racing a rename", path)


def available() -> bool:
    """True when the kernel has openat2 (Linux 5.6+)."""
    try:
        fd = openat2(-100, "/", os.O_PATH | os.O_CLOEXEC, resolve=0)
    except OSError:
        return False
    os.close(fd)
    return True
