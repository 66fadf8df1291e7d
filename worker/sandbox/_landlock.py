"""Landlock through cffi, ABI 1 to 7. Private.

The ruleset handles every access right the running ABI knows (filesystem,
TCP bind/connect, abstract-unix and signal scopes); rules come only from the
directory/file grants held at entry, mapped from privsep ``Rights``. Nothing
else on the filesystem is reachable by path, no TCP port can be bound or
connected, no abstract unix socket outside the sandbox can be reached and no
process outside it can be signalled.

Landlock restricts only the calling thread (no TSYNC before ABI 8), so it is
applied in the single-threaded child right before seccomp.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from protocol import Rights, SandboxError

from ._libc import ffi, lib

ffi.cdef(
    """
    struct privsep_landlock_ruleset_attr { uint64_t handled_access_fs; uint64_t handled_access_net; uint64_t scoped; };
    struct privsep_landlock_path_beneath_attr { uint64_t allowed_access; int32_t parent_fd; };
    """,
    packed=True,
)

SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1
CREATE_RULESET_ERRATA = 2
RULE_PATH_BENEATH = 1

# filesystem access bits (KERNEL-FACTS §2.4)
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13
TRUNCATE = 1 << 14
IOCTL_DEV = 1 << 15
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

FS_NAMES = ["execute", "write_file", "read_file", "read_dir", "remove_dir", "remove_file", "make_char", "make_dir",
            "make_reg", "make_sock", "make_fifo", "make_block", "make_sym", "refer", "truncate", "ioctl_dev"]
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # all a rule on a non-directory may carry


def fs_mask(abi: int) -> int:
    if abi >= 5:
        return (1 << 16) - 1
    if abi >= 3:
        return (1 << 15) - 1
    if abi >= 2:
        return (1 << 14) - 1
    return (1 << 13) - 1 if abi >= 1 else 0


def net_mask(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scope_mask(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def attr_size(abi: int) -> int:
    return 24 if abi >= 6 else 16 if abi >= 4 else 8


def _sys(nr: int, *args: object) -> int:
    cargs = [a if isinstance(a, ffi.CData) else ffi.cast("long", a) for a in args]
    return int(lib.syscall(ffi.cast("long", nr), *cargs))


def abi_version() -> int:
    """Landlock ABI of the running kernel; 0 if Landlock is absent or disabled."""
    rc = _sys(SYS_CREATE_RULESET, ffi.NULL, 0, CREATE_RULESET_VERSION)
    return rc if rc > 0 else 0


def errata() -> int:
    rc = _sys(SYS_CREATE_RULESET, ffi.NULL, 0, CREATE_RULESET_ERRATA)
    return rc if rc >= 0 else 0


def rights_to_access(rights: Rights, is_dir: bool) -> int:
    """Landlock access bits a grant with ``rights`` may use beneath its fd.

    READ -> READ_FILE (+READ_DIR on a directory with LOOKUP), WRITE ->
    WRITE_FILE, FTRUNCATE -> TRUNCATE, IOCTL -> IOCTL_DEV, and on directories
    CREATE -> MAKE_REG, MKDIRAT -> MAKE_DIR, UNLINKAT -> REMOVE_FILE|REMOVE_DIR,
    RENAMEAT -> REFER. EXECUTE, devices, fifos, sockets and symlinks are never
    granted.
    """
    access = 0
    if rights & Rights.READ:
        access |= READ_FILE
    if rights & Rights.WRITE:
        access |= WRITE_FILE
    if rights & Rights.FTRUNCATE:
        access |= TRUNCATE
    if rights & Rights.IOCTL:
        access |= IOCTL_DEV
    if is_dir:
        if rights & Rights.LOOKUP:
            access |= READ_DIR
        if rights & Rights.CREATE:
            access |= MAKE_REG
        if rights & Rights.MKDIRAT:
            access |= MAKE_DIR
        if rights & Rights.UNLINKAT:
            access |= REMOVE_FILE | REMOVE_DIR
        if rights & Rights.RENAMEAT:
            access |= REFER
    else:
        access &= FILE_ONLY
    return access


@dataclass
class Applied:
    abi: int
    handled_fs: int
    handled_net: int
    scoped: int
    rules: list[tuple[int, int]]  # (fd, access) actually added


def apply(fs_rules: Iterable[tuple[int, int]], min_abi: int = 0) -> Applied | None:
    """Restrict the calling thread. Returns None when Landlock is absent and
    ``min_abi`` is 0; raises SandboxError when the kernel is below ``min_abi``
    or any step fails. NO_NEW_PRIVS must already be set."""
    abi = abi_version()
    if abi < max(min_abi, 1):
        if min_abi:
            raise SandboxError(f"policy requires Landlock ABI >= {min_abi}; this kernel has {abi or 'none'}")
        return None
    attr = ffi.new("struct privsep_landlock_ruleset_attr *")
    attr.handled_access_fs = fs_mask(abi)
    attr.handled_access_net = net_mask(abi)
    attr.scoped = scope_mask(abi)
    ruleset = _sys(SYS_CREATE_RULESET, attr, attr_size(abi), 0)
    if ruleset < 0:
        raise SandboxError(f"landlock_create_ruleset: {os.strerror(ffi.errno)}")
    added: list[tuple[int, int]] = []
    try:
        rule = ffi.new("struct privsep_landlock_path_beneath_attr *")
        for fd, rights_value in fs_rules:
            try:
                st = os.fstat(fd)
            except OSError as exc:
                raise SandboxError(f"fs rule fd {fd}: {exc.strerror}") from exc
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue  # pipes, sockets: nothing reachable by path beneath them
            access = rights_to_access(Rights(rights_value), stat.S_ISDIR(st.st_mode)) & fs_mask(abi)
            if not access:
                continue
            rule.allowed_access = access
            rule.parent_fd = fd
            if _sys(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0) != 0:
                err = ffi.errno
                raise SandboxError(f"landlock_add_rule(fd {fd}, {access:#x}): {errno.errorcode.get(err, err)}")
            added.append((fd, access))
        if _sys(SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise SandboxError(f"landlock_restrict_self: {os.strerror(ffi.errno)}")
    finally:
        os.close(ruleset)
    return Applied(abi, fs_mask(abi), net_mask(abi), scope_mask(abi), added)


def warm() -> None:
    """Exercise every call shape ``apply`` uses, each failing harmlessly."""
    attr = ffi.new("struct privsep_landlock_ruleset_attr *")
    rule = ffi.new("struct privsep_landlock_path_beneath_attr *")
    abi_version()
    _sys(SYS_CREATE_RULESET, attr, 0, 0)  # size 0: EINVAL
    _sys(SYS_ADD_RULE, -1, RULE_PATH_BENEATH, rule, 0)  # EBADF
    _sys(SYS_RESTRICT_SELF, -1, 0)  # EBADF
