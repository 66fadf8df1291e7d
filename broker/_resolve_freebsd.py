"""Opening beneath a directory fd on FreeBSD: ``openat(O_RESOLVE_BENEATH)``. Private.

FreeBSD 13+ refuses, with ``ENOTCAPABLE``, any lookup flagged
``O_RESOLVE_BENEATH`` that would leave the tree rooted at the directory fd:
an absolute path, ``..`` past the top, or a symlink that leads out. This is
the FreeBSD counterpart of ``openat2(RESOLVE_BENEATH)`` in
:mod:`worker.sandbox._openat2`.

FreeBSD's ``O_*`` values are its own (``sys/sys/fcntl.h`` @0069e95e9bc6); they
are spelled out below because they differ from Linux's, and Python's ``os``
module has no ``O_RESOLVE_BENEATH``. FreeBSD **ignores unknown open flags**,
so an ``openat`` that succeeds proves nothing about BENEATH. The probe
:func:`beneath_supported` uses ``fstatat(AT_RESOLVE_BENEATH)`` instead, whose
flags the kernel checks strictly, and :func:`openat_beneath` refuses to run
(fails closed) where the probe fails.

The module imports everywhere; off FreeBSD :func:`beneath_supported` is False
and :func:`openat_beneath` raises ``OSError(ENOSYS)``.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from protocol import NotCapable

__all__ = [
    "AT_RESOLVE_BENEATH",
    "O_RESOLVE_BENEATH",
    "beneath_supported",
    "openat_beneath",
]

IS_FREEBSD = sys.platform.startswith("freebsd")

# sys/sys/fcntl.h @0069e95e9bc6 (FreeBSD values, NOT Linux's)
O_RDONLY = 0x0000
O_WRONLY = 0x0001
O_RDWR = 0x0002
O_ACCMODE = 0x0003
O_NONBLOCK = 0x0004
O_APPEND = 0x0008
O_SHLOCK = 0x0010
O_EXLOCK = 0x0020
O_ASYNC = 0x0040
O_FSYNC = 0x0080
O_SYNC = 0x0080
O_NOFOLLOW = 0x0100
O_CREAT = 0x0200
O_TRUNC = 0x0400
O_EXCL = 0x0800
O_NOCTTY = 0x8000
O_DIRECT = 0x00010000
O_DIRECTORY = 0x00020000
O_EXEC = 0x00040000
O_TTY_INIT = 0x00080000
O_CLOEXEC = 0x00100000
O_VERIFY = 0x00200000
O_PATH = 0x00400000
O_RESOLVE_BENEATH = 0x00800000
O_DSYNC = 0x01000000

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x0200
AT_RESOLVE_BENEATH = 0x2000
AT_EMPTY_PATH = 0x4000

ENOTCAPABLE = 93  # sys/sys/errno.h; 93 is EPROTONOSUPPORT on Linux
ECAPMODE = 94

# Every open flag this FreeBSD header defines. Anything else is refused: the
# kernel would ignore it silently, and a Linux-valued constant passed by
# mistake must not turn into some other FreeBSD flag unnoticed.
KNOWN_O_FLAGS = (
    O_ACCMODE
    | O_NONBLOCK
    | O_APPEND
    | O_SHLOCK
    | O_EXLOCK
    | O_ASYNC
    | O_FSYNC
    | O_NOFOLLOW
    | O_CREAT
    | O_TRUNC
    | O_EXCL
    | O_NOCTTY
    | O_DIRECT
    | O_DIRECTORY
    | O_EXEC
    | O_TTY_INIT
    | O_CLOEXEC
    | O_VERIFY
    | O_PATH
    | O_RESOLVE_BENEATH
    | O_DSYNC
)

# What the broker ORs into every open (DESIGN: O_NOCTTY | O_NONBLOCK | O_CLOEXEC).
BROKER_OPEN_FLAGS = O_NOCTTY | O_NONBLOCK | O_CLOEXEC

_STAT_BUF = 1024  # larger than FreeBSD's struct stat (224 bytes on amd64 since 12.0)

_ffi: Any = None
_lib: Any = None
_supported: bool | None = None


def _bindings() -> tuple[Any, Any]:
    global _ffi, _lib
    if _lib is None:
        import cffi

        ffi = cffi.FFI()
        # struct stat is only written to, so an opaque buffer is ABI-compatible.
        ffi.cdef("int fstatat(int fd, const char *path, void *sb, int flag);")
        lib = ffi.dlopen(None)
        lib.fstatat  # noqa: B018 - resolve the symbol now (ABI mode is lazy)
        _ffi, _lib = ffi, lib
    return _ffi, _lib


def beneath_supported() -> bool:
    """True when this kernel enforces ``AT_RESOLVE_BENEATH``/``O_RESOLVE_BENEATH``.

    Probe: ``fstatat(AT_FDCWD, "/", AT_RESOLVE_BENEATH)``. A kernel that knows
    the flag refuses the absolute path with ``ENOTCAPABLE``; one that does not
    says ``EINVAL`` (fstatat checks its flags strictly). Anything else,
    including success, counts as unsupported. Cached after the first call.
    """
    global _supported
    if _supported is not None:
        return _supported
    if not IS_FREEBSD:
        _supported = False
        return False
    try:
        ffi, lib = _bindings()
    except Exception:
        _supported = False
        return False
    buf = ffi.new("char[]", _STAT_BUF)
    rc = int(lib.fstatat(AT_FDCWD, b"/", buf, AT_RESOLVE_BENEATH))
    result = rc == -1 and ffi.errno == ENOTCAPABLE
    _supported = result
    return result


def openat_beneath(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """``openat(dirfd, path, flags | O_RESOLVE_BENEATH | O_CLOEXEC, mode)``; returns a new fd.

    ``flags`` are FreeBSD open flags (``os.O_*`` on FreeBSD, or this module's
    constants). An escape (absolute path, ``..`` out, a symlink leading out)
    raises :class:`protocol.NotCapable` with errno ``ENOTCAPABLE`` (or
    ``ECAPMODE``) and the ``OSError`` as ``__cause__``; other failures raise
    ``OSError``. Refuses to open at all where :func:`beneath_supported` is
    False, since the kernel would ignore the flag.
    """
    if not IS_FREEBSD:
        raise OSError(
            errno.ENOSYS,
            f"O_RESOLVE_BENEATH is FreeBSD's; this platform is {sys.platform!r} (use worker.sandbox._openat2)",
            path,
        )
    if not isinstance(path, str) or "\0" in path:
        raise ValueError(f"path must be a str without NUL, got {path!r}")
    unknown = flags & ~KNOWN_O_FLAGS
    if unknown:
        raise ValueError(f"open flags {flags:#x} have bits FreeBSD does not define: {unknown:#x}")
    if not beneath_supported():
        raise OSError(
            errno.EOPNOTSUPP,
            "this kernel does not enforce O_RESOLVE_BENEATH (FreeBSD 13+ needed); refusing to open",
            path,
        )
    try:
        return os.open(path, flags | O_RESOLVE_BENEATH | O_CLOEXEC, mode, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno in (ENOTCAPABLE, ECAPMODE):
            raise NotCapable(
                "path escapes its granted directory (absolute, '..' or a symlink leading out)",
                errno=exc.errno,
                filename=path,
            ) from exc
        raise
