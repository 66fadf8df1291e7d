"""Capsicum-named rights carried by every grant.

Bit values are privsep's own; the FreeBSD ``CAP_*`` encoding lives in
``worker.sandbox._capsicum_rights``. Composite rights mirror Capsicum's
(``MMAP_R`` = ``MMAP | SEEK | READ``), so ``Rights.READ in Rights.MMAP_R``.
Rights only ever shrink: :meth:`Rights.limit` refuses to widen.
"""

from __future__ import annotations

import enum
import functools

from ._errors import NotCapable


class Rights(enum.IntFlag):
    """A set of rights on one file descriptor."""

    NONE = 0
    READ = 1 << 0
    WRITE = 1 << 1
    SEEK = 1 << 2
    MMAP = 1 << 3
    _MMAP_X_BIT = 1 << 4  # private: only meaningful inside MMAP_X
    FSTAT = 1 << 5
    FTRUNCATE = 1 << 6
    FSYNC = 1 << 7
    LOOKUP = 1 << 8
    CREATE = 1 << 9
    UNLINKAT = 1 << 10
    FCHMOD = 1 << 11
    FCHOWN = 1 << 12
    FLOCK = 1 << 13
    IOCTL = 1 << 14
    FUTIMES = 1 << 15
    FSTATFS = 1 << 16
    FCNTL = 1 << 17
    MKDIRAT = 1 << 18
    RENAMEAT = 1 << 19
    APPEND = 1 << 20  # write only at the end; the worker cannot clear O_APPEND
    # sockets and events
    ACCEPT = 1 << 24
    BIND = 1 << 25
    CONNECT = 1 << 26
    LISTEN = 1 << 27
    SHUTDOWN = 1 << 28
    GETSOCKOPT = 1 << 29
    SETSOCKOPT = 1 << 30
    EVENT = 1 << 31
    # Capsicum composites
    MMAP_R = MMAP | SEEK | READ
    MMAP_W = MMAP | SEEK | WRITE
    MMAP_X = MMAP | SEEK | _MMAP_X_BIT
    PREAD = SEEK | READ
    PWRITE = SEEK | WRITE
    RECV = READ
    SEND = WRITE

    @classmethod
    def all(cls) -> Rights:
        """Every right privsep knows."""
        value = cls.NONE
        for member in cls.__members__.values():
            value |= member
        return value

    def names(self) -> list[str]:
        """Names of the single-bit rights in this set, for messages and logs."""
        out = []
        for name, member in Rights.__members__.items():
            if member and (member & (member - 1)) == 0 and member in self and not name.startswith("_"):
                if name in ("RECV", "SEND"):
                    continue
                out.append(name)
        if self & Rights._MMAP_X_BIT:
            out.append("MMAP_X")
        return out

    def describe(self) -> str:
        return _describe(int(self))

    def limit(self, wanted: Rights) -> Rights:
        """Return ``wanted`` if it is a subset of ``self``; raise otherwise.

        This is the only way rights change: they shrink, never grow.
        """
        wanted = Rights(wanted)
        extra = wanted & ~self
        if extra:
            raise NotCapable(f"rights {Rights(extra).describe()} exceed the {self.describe()} held")
        return wanted


_ALL = int(Rights.all())


@functools.lru_cache(maxsize=1024)
def _describe(value: int) -> str:
    # Walking the flag members costs ~20 us; audit events and errors name the same few sets.
    return "|".join(Rights(value).names()) or "NONE"


def rights_arg(value: object) -> Rights:
    """``rights`` as a caller passed them: Rights flags, or their int."""
    if type(value) is Rights:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Rights(value)
    hint = " (a mode string is open()'s: ask for Rights.READ, Rights.WRITE, ...)" if isinstance(value, str) else ""
    raise TypeError(f"rights must be Rights flags, such as Rights.READ | Rights.SEEK, not {value!r}{hint}")


def rights_from_wire(value: object) -> Rights:
    """Validate a rights integer received from a peer."""
    if type(value) is not int or value < 0 or value & ~_ALL:
        from ._errors import ProtocolError

        raise ProtocolError(f"invalid rights value {value!r}")
    return _rights_of(value)


@functools.lru_cache(maxsize=512)
def _rights_of(value: int) -> Rights:
    return Rights(value)  # building a flag value costs about a microsecond; the same few recur
