"""Broker side of seccomp user notification: raw ioctls through cffi. Private.

The worker's filter sends every syscall it does not allow to the listener fd
the worker handed over at entry. The broker (the supervisor) polls that fd,
receives the notification (exact syscall number and arguments, KERNEL-FACTS
§3.3/3.5) and either answers with an errno or kills the worker. It never
answers CONTINUE: pointer arguments could change between check and use.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from worker.sandbox._libc import ffi, lib
from worker.sandbox._syscalls import name_of

ffi.cdef(
    """
    struct privsep_seccomp_data { int nr; uint32_t arch; uint64_t instruction_pointer; uint64_t args[6]; };
    struct privsep_seccomp_notif { uint64_t id; uint32_t pid; uint32_t flags; struct privsep_seccomp_data data; };
    struct privsep_seccomp_notif_resp { uint64_t id; int64_t val; int32_t error; uint32_t flags; };
    int ioctl(int fd, unsigned long request, ...);
    """
)

IOCTL_NOTIF_RECV = 0xC0502100
IOCTL_NOTIF_SEND = 0xC0182101
IOCTL_NOTIF_ID_VALID = 0x40082102
AUDIT_ARCH_X86_64 = 0xC000003E
assert ffi.sizeof("struct privsep_seccomp_notif") == 80
assert ffi.sizeof("struct privsep_seccomp_notif_resp") == 24


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int
    nr: int
    name: str
    arch: int
    args: tuple[int, ...]


def syscall_name(nr: int) -> str:
    """Name of an x86_64 syscall number (x32 numbers as ``x32:name``)."""
    return name_of(nr)


def _ioctl(fd: int, request: int, arg: object) -> None:
    while True:
        if int(lib.ioctl(fd, ffi.cast("unsigned long", request), arg)) == 0:
            return
        err = ffi.errno
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def receive(listener_fd: int) -> Notification:
    """Receive one pending notification. Call only after poll() gave POLLIN:
    RECV blocks otherwise, whatever O_NONBLOCK says. Raises OSError (ENOENT)
    if the target died or the notification was withdrawn meanwhile."""
    notif = ffi.new("struct privsep_seccomp_notif *")  # zeroed: the kernel refuses dirty buffers
    _ioctl(listener_fd, IOCTL_NOTIF_RECV, notif)
    nr = int(notif.data.nr)
    if notif.data.arch != AUDIT_ARCH_X86_64:
        name = f"arch{int(notif.data.arch):#x}:syscall_{nr}"
    else:
        name = syscall_name(nr)
    return Notification(
        id=int(notif.id),
        pid=int(notif.pid),
        nr=nr,
        name=name,
        arch=int(notif.data.arch),
        args=tuple(int(notif.data.args[i]) for i in range(6)),
    )


def respond_errno(listener_fd: int, notif_id: int, err: int) -> None:
    """Make the blocked syscall fail with ``err`` (a positive errno)."""
    if not 0 < err < 4096:
        raise ValueError("errno out of range")
    resp = ffi.new("struct privsep_seccomp_notif_resp *")
    resp.id = notif_id
    resp.error = -err
    _ioctl(listener_fd, IOCTL_NOTIF_SEND, resp)


def id_valid(listener_fd: int, notif_id: int) -> bool:
    """True while the notification is still pending (target alive, unanswered)."""
    idp = ffi.new("uint64_t *", notif_id)
    try:
        _ioctl(listener_fd, IOCTL_NOTIF_ID_VALID, idp)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True
