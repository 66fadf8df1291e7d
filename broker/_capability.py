"""Capabilities: rights-limited file descriptors held by the broker."""

from __future__ import annotations

import fcntl
import os
from typing import Any, NoReturn

from protocol import Rights
from protocol._wire import KIND_FILE, kind_of_mode

_O_PATH = getattr(os, "O_PATH", 0)
# (access mode, regular file) -> rights, made once: enum arithmetic per received fd costs microseconds.
_RIGHTS_OF = {
    (mode, regular): Rights(
        (Rights.READ if mode in (os.O_RDONLY, os.O_RDWR) else Rights.NONE)
        | (Rights.WRITE if mode in (os.O_WRONLY, os.O_RDWR) else Rights.NONE)
        | (Rights.FSTAT if regular else Rights.NONE)
    )
    for mode in range(4)  # O_ACCMODE values; 3 is no access mode at all
    for regular in (False, True)
}


class Capability:
    """An fd plus the rights it carries. Owns the fd; ``close()`` sets it to -1.

    Pass it as an argument to a worker call and the worker receives its own
    copy of the fd (as a file object whose mode follows the rights). The
    broker's copy stays open until closed here or garbage-collected; it
    must be open when the call is sent: given to ``pool.submit()``, keep it
    open until the future is done (a task sent after it was closed fails
    with ``ValueError: capability is closed``).
    """

    __slots__ = ("__weakref__", "_fd", "kind", "name", "rights")

    def __init__(self, fd: int, rights: Rights, kind: int = KIND_FILE, name: str = ""):
        self._fd = fd
        self.rights = rights if type(rights) is Rights else Rights(rights)
        self.kind = kind
        self.name = name

    @staticmethod
    def from_untrusted_fd(fd: int, name: str = "") -> Capability:
        """Wrap an fd received from a worker (ownership taken). Its kind and
        rights come from the fd itself (file type, access mode), never from
        what the worker claimed; they are read when first asked for, as
        neither can change after open (a call answered with a file the
        caller only closes costs no syscall for them)."""
        return _Received(fd, name)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("capability is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd and return it."""
        fd, self._fd = self._fd, -1
        return fd

    def read_all(self, limit: int = 1 << 30) -> bytes:
        """Read the whole file from offset 0 (for the broker's own use)."""
        if not self.rights & Rights.READ:
            raise PermissionError("capability lacks READ")
        chunks = []
        pos = 0
        while pos < limit:
            chunk = os.pread(self.fileno(), min(1 << 20, limit - pos), pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
        return b"".join(chunks)

    def __privsep_fd__(self) -> tuple[int, int, Rights]:
        return self.fileno(), self.kind, self.rights

    def __copy__(self) -> Capability:
        """A capability of its own: a dup of the fd, with the same rights (a
        copy of the number would be a second owner, closing it twice)."""
        return Capability(os.dup(self.fileno()), self.rights, self.kind, self.name)

    def __deepcopy__(self, memo: object) -> Capability:
        return self.__copy__()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError(
            "a Capability is an open file descriptor and cannot be pickled: pass it in a worker call "
            "(it travels by SCM_RIGHTS), or copy.copy() it for a dup"
        )

    def __enter__(self) -> Capability:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # (checked here first: most are closed already, and this runs for each one; no _fd: its
        # __init__ was interrupted, a signal handler's exception in it)
        if getattr(self, "_fd", -1) >= 0:
            try:
                self.close()
            except OSError:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Capability {self.name!r} {self.rights.describe()} {state}>"


class _Received(Capability):
    """A capability for an fd a worker sent. Its ``kind`` and ``rights``
    slots stay unset until first read: the read fails over to
    ``__getattr__``, which derives both from the fd and sets them."""

    __slots__ = ()

    def __init__(self, fd: int, name: str = ""):  # (kind and rights: left unset)
        self._fd = fd
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        if attr not in ("kind", "rights"):
            raise AttributeError(attr)
        fd = self.fileno()
        kind = kind_of_mode(os.fstat(fd).st_mode)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        # An O_PATH fd reads as O_RDONLY but can do no I/O at all.
        self.rights = Rights.NONE if flags & _O_PATH else _RIGHTS_OF[flags & os.O_ACCMODE, kind == KIND_FILE]
        self.kind = kind
        return getattr(self, attr)

    def __repr__(self) -> str:
        if self._fd < 0:
            try:
                _ = self.rights
            except ValueError:  # closed before anyone asked
                return f"<Capability {self.name!r} closed>"
        return super().__repr__()
