"""Raw libc entry points through cffi (ABI mode). Private: ints in, ints out.

Every call returns the raw result; callers turn ``-1`` into ``OSError`` with
:func:`check`.
"""

from __future__ import annotations

import os

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);
    long syscall(long number, ...);
    """
)
lib = ffi.dlopen(None)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_GET_SECCOMP = 21


def check(result: int, what: str) -> int:
    """Raise OSError (errno from the C library) when ``result`` is -1."""
    if result == -1:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(lib.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def syscall(nr: int, *args: object) -> int:
    """Call ``syscall(nr, ...)``; integer args are passed as ``long``."""
    cargs = [a if isinstance(a, ffi.CData) else ffi.cast("long", a) for a in args]
    return int(lib.syscall(ffi.cast("long", nr), *cargs))
