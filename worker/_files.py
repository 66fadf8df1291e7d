"""Turn received file descriptors into Python objects, and back.

A file passed to a worker arrives as a binary file object whose access mode
matches its rights: READ gives a reader, WRITE a writer, both a read/write
file, APPEND an appending writer. The object owns the fd.
"""

from __future__ import annotations

import io
import os
import stat
from typing import Any

from protocol import Rights
from protocol._wire import KIND_DIR, KIND_FILE, KIND_MEMFD, KIND_STREAM, ReceivedFd


def mode_for(rights: Rights) -> str:
    readable = bool(rights & Rights.READ)
    writable = bool(rights & (Rights.WRITE | Rights.APPEND))
    if rights & Rights.APPEND:
        return "a+b" if readable else "ab"
    if readable and writable:
        return "r+b"
    if writable:
        return "wb"
    return "rb"


class Directory:
    """A directory capability held by the worker. Owns its fd."""

    def __init__(self, fd: int, rights: Rights):
        self._fd = fd
        self.rights = rights

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed directory")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def __privsep_fd__(self) -> tuple[int, int, Rights]:
        return self.fileno(), KIND_DIR, self.rights


def wrap_received(rfd: ReceivedFd) -> Any:
    """Take ownership of a received fd and return the matching object."""
    rights = rfd.rights
    if rfd.kind == KIND_DIR:
        return Directory(rfd.detach(), rights)
    fd = rfd.detach()
    try:
        f = os.fdopen(fd, mode_for(rights), buffering=-1 if rfd.kind != KIND_STREAM else 0)
    except BaseException:
        os.close(fd)
        raise
    try:
        f.rights = rights  # type: ignore[union-attr]
    except AttributeError:
        pass
    return f


def fd_of(obj: Any) -> tuple[int, int, Rights]:
    """Describe a file object a worker returns, for sending it to the broker.

    The broker does not trust this description; it re-derives the rights
    from the fd itself.
    """
    if isinstance(obj, io.IOBase) and not obj.closed:
        if isinstance(obj, io.BufferedWriter | io.BufferedRandom):
            obj.flush()
        fd = obj.fileno()
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            kind = KIND_DIR
        elif stat.S_ISREG(st.st_mode):
            kind = KIND_FILE
        else:
            kind = KIND_STREAM
        rights = Rights.NONE
        if obj.readable():
            rights |= Rights.READ
        if obj.writable():
            rights |= Rights.WRITE
        return fd, kind, rights
    raise TypeError(f"cannot send a {type(obj).__name__} to the broker")


__all__ = ["KIND_FILE", "KIND_MEMFD", "Directory", "fd_of", "mode_for", "wrap_received"]
