"""Drop every capability at entry. Private.

A worker forked from a root broker would otherwise keep CAP_SYS_RESOURCE
(raise its own rlimits again), CAP_DAC_OVERRIDE (ignore file modes beneath a
directory grant), CAP_SYS_ADMIN and the rest for whatever syscalls seccomp
lets through. In a new user namespace the caps it holds there go too. The
bounding set is left alone: it only matters across execve, which is denied.
"""

from __future__ import annotations

import os

from ._libc import ffi, lib

SYS_CAPGET = 125
SYS_CAPSET = 126
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def drop_all() -> None:
    """Clear the effective, permitted, inheritable and ambient sets."""
    header = ffi.new("uint32_t[2]", [_LINUX_CAPABILITY_VERSION_3, 0])
    data = ffi.new("uint32_t[6]")  # two {effective, permitted, inheritable}, all zero
    lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on pre-4.3 kernels: nothing to clear
    if int(lib.syscall(ffi.cast("long", SYS_CAPSET), header, data)) != 0:
        err = ffi.errno
        raise OSError(err, f"capset: {os.strerror(err)}")


def warm() -> None:
    """Build cffi's call interface for capset's argument types (via capget,
    which only reads)."""
    header = ffi.new("uint32_t[2]", [_LINUX_CAPABILITY_VERSION_3, 0])
    data = ffi.new("uint32_t[6]")
    lib.syscall(ffi.cast("long", SYS_CAPGET), header, data)
