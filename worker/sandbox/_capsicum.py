"""FreeBSD Capsicum through cffi (ABI mode). Private.

Loaded only where ``sys.platform`` starts with ``"freebsd"``. Elsewhere the
module still imports: :func:`available` is False, :func:`in_capability_mode`
is False, and the functions that would enforce something raise
(:class:`protocol.UnsupportedRights` for rights, :class:`protocol.SandboxError`
for capability mode) with the reason, so nothing is silently skipped.

The ``cap_rights_t`` is filled here word by word from
:mod:`worker.sandbox._capsicum_rights` (element 0 = ``CAP_NONE[0]`` | index-0
rights, element 1 = ``CAP_NONE[1]`` | index-1 rights) and passed straight to
``cap_rights_limit(2)``; the variadic ``__cap_rights_init`` is bound only to
cross-check that encoding in the FreeBSD tests (each variadic argument is
cast to ``uint64_t``, as cffi requires, and the list ends in a ``0`` sentinel).

Errors: ``ENOTCAPABLE`` (93) and ``ECAPMODE`` (94) become
:class:`protocol.NotCapable` carrying that errno, with the ``OSError`` as
``__cause__``; other errors (``EBADF``, ``EINVAL``) are raised as ``OSError``.
If a call fails half-way through :func:`limit_fd` the fd may be partly
limited: close it, never pass it on.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import sys
from collections.abc import Iterable
from typing import Any

from protocol import NotCapable, Rights, SandboxError, UnsupportedRights

from . import _capsicum_rights as _cr

__all__ = [
    "ECAPMODE",
    "ENOTCAPABLE",
    "available",
    "enter_capability_mode",
    "get_fcntls",
    "get_ioctls",
    "get_rights",
    "in_capability_mode",
    "limit_fd",
]

# sys/sys/errno.h. On Linux 93/94 mean EPROTONOSUPPORT/ESOCKTNOSUPPORT, so
# never compare against errno.ENOTCAPABLE from another platform's table.
ENOTCAPABLE = 93
ECAPMODE = 94
_FREEBSD_O_APPEND = 0x0008  # sys/sys/fcntl.h; os.O_APPEND is the same on FreeBSD

IS_FREEBSD = sys.platform.startswith("freebsd")

CDEF = """
typedef struct cap_rights { uint64_t cr_rights[2]; } cap_rights_t;
typedef unsigned long cap_ioctl_t;

int cap_enter(void);
int cap_getmode(unsigned int *modep);
bool cap_sandboxed(void);

cap_rights_t *__cap_rights_init(int version, cap_rights_t *rights, ...);
int cap_rights_limit(int fd, const cap_rights_t *rights);
int __cap_rights_get(int version, int fd, cap_rights_t *rights);

int cap_ioctls_limit(int fd, const cap_ioctl_t *cmds, size_t ncmds);
ssize_t cap_ioctls_get(int fd, cap_ioctl_t *cmds, size_t maxcmds);

int cap_fcntls_limit(int fd, uint32_t fcntlrights);
int cap_fcntls_get(int fd, uint32_t *fcntlrightsp);
"""


def make_ffi() -> Any:
    """A fresh ``cffi.FFI`` with the Capsicum declarations (works on any OS)."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    return ffi


_ffi: Any = None
_lib: Any = None
_load_error: str | None = None


def _bindings() -> tuple[Any, Any]:
    """(ffi, lib) on FreeBSD; raises UnsupportedRights elsewhere or on failure."""
    global _ffi, _lib, _load_error
    if _lib is not None:
        return _ffi, _lib
    if not IS_FREEBSD:
        raise UnsupportedRights(
            f"Capsicum is FreeBSD's; this platform is {sys.platform!r}, where rights are enforced by "
            "access modes, Landlock, seccomp and broker substitutes instead",
            errno=_errno.EOPNOTSUPP,
        )
    if _load_error is not None:
        raise UnsupportedRights(_load_error, errno=_errno.EOPNOTSUPP)
    try:
        ffi = make_ffi()
        lib = ffi.dlopen(None)
        # ABI mode resolves symbols lazily; touch each one now so a libc
        # without Capsicum fails here, not half-way through limit_fd.
        for name in (
            "cap_enter",
            "cap_getmode",
            "cap_sandboxed",
            "__cap_rights_init",
            "cap_rights_limit",
            "__cap_rights_get",
            "cap_ioctls_limit",
            "cap_ioctls_get",
            "cap_fcntls_limit",
            "cap_fcntls_get",
        ):
            getattr(lib, name)
    except Exception as exc:  # cffi raises OSError/AttributeError/CDefError
        _load_error = f"cannot load the Capsicum functions from libc: {exc}"
        raise UnsupportedRights(_load_error, errno=_errno.EOPNOTSUPP) from exc
    _ffi, _lib = ffi, lib
    return ffi, lib


def _raise(err: int, what: str, fd: int | None = None) -> None:
    where = f" on fd {fd}" if fd is not None else ""
    cause = OSError(err, f"{what}{where}: {os.strerror(err)}")
    if err in (ENOTCAPABLE, ECAPMODE):
        raise NotCapable(f"{what}{where}: {os.strerror(err)}", errno=err) from cause
    raise cause


def available() -> bool:
    """True on FreeBSD when libc has the Capsicum calls and the kernel has capability mode."""
    if not IS_FREEBSD:
        return False
    try:
        ffi, lib = _bindings()
    except UnsupportedRights:
        return False
    mode = ffi.new("unsigned int *")
    # A kernel without "options CAPABILITY_MODE" answers ENOSYS.
    return int(lib.cap_getmode(mode)) == 0


def in_capability_mode() -> bool:
    """True when this process is in capability mode (always False off FreeBSD)."""
    if not IS_FREEBSD:
        return False
    ffi, lib = _bindings()
    mode = ffi.new("unsigned int *")
    if int(lib.cap_getmode(mode)) == -1:
        err = ffi.errno
        if err == _errno.ENOSYS:
            return False
        _raise(err, "cap_getmode")
    return bool(mode[0])


def enter_capability_mode() -> None:
    """``cap_enter(2)``: irreversible. Raises SandboxError if it cannot be entered."""
    if not IS_FREEBSD:
        raise SandboxError(
            f"capability mode (cap_enter) is FreeBSD's Capsicum; this platform is {sys.platform!r}, where the "
            "worker is confined by seccomp, Landlock and no_new_privs instead"
        )
    try:
        ffi, lib = _bindings()
    except UnsupportedRights as exc:
        raise SandboxError(f"cannot enter capability mode: {exc}") from exc
    if int(lib.cap_enter()) == -1:
        err = ffi.errno
        raise SandboxError(f"cap_enter failed: {os.strerror(err)}") from OSError(err, os.strerror(err))
    if not in_capability_mode():  # fail closed: never believe an unverified entry
        raise SandboxError("cap_enter returned 0 but cap_getmode reports the process is not in capability mode")


def limit_fd(fd: int, rights: Rights, *, ioctls: Iterable[int] | None = None) -> None:
    """Limit ``fd`` to ``rights`` with ``cap_rights_limit(2)``, then its ioctls and fcntls.

    * The ``cap_rights_t`` is built by :func:`_capsicum_rights.encode_cap_words`.
    * With ``IOCTL``: ``ioctls`` is the allow-list for ``cap_ioctls_limit``
      (empty = none); ``None`` leaves every ioctl allowed.
    * With ``FCNTL``: ``cap_fcntls_limit`` gets GETFL|SETFL|GETOWN, without
      SETFL when the rights include ``APPEND``.
    * ``APPEND`` is refused unless ``fd`` already has ``O_APPEND`` set.

    Asking for more than the fd holds raises :class:`NotCapable` (ENOTCAPABLE):
    rights only shrink. Off FreeBSD it raises :class:`UnsupportedRights`.
    """
    rights = Rights(rights)
    if not IS_FREEBSD:
        raise UnsupportedRights(
            f"cannot limit fd {fd} to {rights.describe()} with cap_rights_limit: Capsicum is FreeBSD's and this "
            f"platform is {sys.platform!r}",
            errno=_errno.EOPNOTSUPP,
        )
    ffi, lib = _bindings()
    w0, w1 = _cr.encode_cap_words(rights)  # ValueError for bits privsep does not know
    cmds = _cr.ioctl_limit(rights, ioctls)
    fcntls = _cr.fcntl_limit(rights)

    if Rights.APPEND in rights:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            raise UnsupportedRights(
                f"APPEND on fd {fd} cannot be checked (F_GETFL: {exc.strerror}); refusing it", errno=_errno.EOPNOTSUPP
            ) from exc
        if not flags & _FREEBSD_O_APPEND:
            raise UnsupportedRights(
                f"APPEND asked for fd {fd}, which was not opened with O_APPEND; FreeBSD has no Capsicum right for it",
                errno=_errno.EOPNOTSUPP,
            )

    rights_t = ffi.new("cap_rights_t *")
    rights_t.cr_rights[0] = w0
    rights_t.cr_rights[1] = w1
    if int(lib.cap_rights_limit(fd, rights_t)) == -1:
        _raise(ffi.errno, f"cap_rights_limit({rights.describe()})", fd)

    if cmds is not None and Rights.IOCTL in rights:
        arr = ffi.new("cap_ioctl_t[]", max(len(cmds), 1))
        for i, cmd in enumerate(cmds):
            arr[i] = cmd
        if int(lib.cap_ioctls_limit(fd, arr, len(cmds))) == -1:
            _raise(ffi.errno, f"cap_ioctls_limit({len(cmds)} commands)", fd)

    if Rights.FCNTL in rights and int(lib.cap_fcntls_limit(fd, fcntls)) == -1:
        _raise(ffi.errno, f"cap_fcntls_limit({fcntls:#x})", fd)


def get_rights_words(fd: int) -> tuple[int, int]:
    """The raw ``cr_rights`` words of ``fd`` (``__cap_rights_get``)."""
    ffi, lib = _bindings()
    rights_t = ffi.new("cap_rights_t *")
    if int(lib.__cap_rights_get(_cr.CAP_RIGHTS_VERSION, fd, rights_t)) == -1:
        _raise(ffi.errno, "cap_rights_get", fd)
    return int(rights_t.cr_rights[0]), int(rights_t.cr_rights[1])


def get_rights(fd: int) -> Rights:
    """The privsep rights ``fd`` holds (bits privsep does not map are ignored)."""
    return _cr.decode_cap_words(*get_rights_words(fd))


def get_ioctls(fd: int) -> list[int] | None:
    """The ioctl allow-list of ``fd``; ``None`` when every ioctl is allowed."""
    ffi, lib = _bindings()
    arr = ffi.new("cap_ioctl_t[]", _cr.IOCTLS_MAX_COUNT)
    n = int(lib.cap_ioctls_get(fd, arr, _cr.IOCTLS_MAX_COUNT))
    if n == -1:
        _raise(ffi.errno, "cap_ioctls_get", fd)
    if n == _cr.CAP_IOCTLS_ALL:
        return None
    return sorted(int(arr[i]) for i in range(min(n, _cr.IOCTLS_MAX_COUNT)))


def get_fcntls(fd: int) -> int:
    """The ``CAP_FCNTL_*`` mask of ``fd``."""
    ffi, lib = _bindings()
    out = ffi.new("uint32_t *")
    if int(lib.cap_fcntls_get(fd, out)) == -1:
        _raise(ffi.errno, "cap_fcntls_get", fd)
    return int(out[0])


def libc_rights_init(values: Iterable[int]) -> tuple[int, int]:
    """``cap_rights_init(&r, values..., 0)`` through libc, for cross-checking.

    Every value is validated first (exactly one index marker, version 0):
    libc ``assert()``s on a bad one and would abort the process.
    """
    ffi, lib = _bindings()
    vals = list(values)
    for v in vals:
        _cr._index_of(v)
    rights_t = ffi.new("cap_rights_t *")
    args = [ffi.cast("uint64_t", v) for v in vals]
    lib.__cap_rights_init(_cr.CAP_RIGHTS_VERSION, rights_t, *args, ffi.cast("uint64_t", 0))
    return int(rights_t.cr_rights[0]), int(rights_t.cr_rights[1])
