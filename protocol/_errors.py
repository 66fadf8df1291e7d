"""One exception family for privsep.

Every error privsep raises is a :class:`PrivsepError`. Where an ``OSError``
caused it, that error is kept as ``__cause__``.
"""

from __future__ import annotations

import errno as _errno
from typing import Any


class PrivsepError(Exception):
    """Root of every privsep error."""


class NotCapable(PrivsepError, PermissionError):
    """A request was denied: the policy or the rights held do not allow it.

    It is a :class:`PermissionError` with an errno (``EACCES`` unless a more
    precise one applies), on the broker's side and in the worker alike.
    """

    def __init__(self, message: str = "not capable", errno: int = _errno.EACCES, filename: str | None = None):
        if filename is None:
            PermissionError.__init__(self, errno, message)
        else:
            PermissionError.__init__(self, errno, message, filename)

    def __str__(self) -> str:
        base = self.strerror or "not capable"
        return f"{base}: {self.filename!r}" if self.filename is not None else base

    def __reduce__(self) -> Any:  # never pickled over the wire; for copy, and pickle between the caller's processes
        return (type(self), (self.strerror, self.errno, self.filename), self.__dict__ or None)


class UnsupportedRights(NotCapable):
    """A right was asked for that this platform cannot enforce on this grant."""


class PolicyError(PrivsepError, ValueError):
    """A policy is malformed; raised when the policy is built."""


class ProtocolError(PrivsepError):
    """A peer sent something that breaks the wire rules. Costs it its connection.
    (One that carries ``remote_traceback`` was raised in a worker, which serves on.)"""


class MessageTooLarge(PrivsepError, ValueError):
    """A message its sender cannot send: past the packet size even with its
    large strings and byte strings moved to memfds, or with more fds than one
    message carries. Raised before anything is sent: the peer is unharmed.
    Pass a file instead, or fewer values."""


class SandboxError(PrivsepError):
    """The sandbox could not be entered as the policy demands (fails closed)."""


class RemoteError(PrivsepError):
    """An exception a worker raised that does not come back as itself: a
    class of the worker's own (then also its nearest builtin parent), or one
    only the broker may raise (``WorkerCrashed``, ``SystemExit``, ...)."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = ""):
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> Any:
        """Made again from what came over the wire, so that ``copy`` and
        ``pickle`` (between the caller's own processes: never over a channel)
        work for the classes made on arrival too, which no module holds."""
        cls = type(self)
        if cls is not RemoteError and cls.__module__ != _REMOTE_MODULE:
            return super().__reduce__()  # a subclass of the caller's own
        bases = cls.__bases__
        wire = {
            "type": self.type_name,
            "msg": self.remote_message,
            "errno": self.errno if isinstance(self, OSError) else None,
            "filename": self.filename if isinstance(self, OSError) else None,
            "tb": self.remote_traceback,
            "base": bases[1].__name__ if len(bases) == 2 else "Exception",
        }
        return (_remote_from_wire, (wire,), self.__dict__)


_REMOTE_MODULE = "privsep.remote"  # the module named by the classes made for a worker's exceptions


def _remote_from_wire(wire: dict[str, Any]) -> BaseException:
    from ._remote import exception_from_wire  # (it imports this module)

    return exception_from_wire(wire)


class WorkerCrashed(PrivsepError):
    """The worker died or was stopped. ``exit`` holds the structured reason."""

    def __init__(self, message: str, exit: Any = None):
        super().__init__(message)
        self.exit = exit


class WorkerTimeout(WorkerCrashed, TimeoutError):
    """A call ran past its timeout; the worker was killed."""


class PolicyViolation(WorkerCrashed):
    """The sandbox stopped the worker for a forbidden system call.

    ``syscall`` is the syscall's name and ``args`` its six raw arguments.
    """

    def __init__(self, message: str, exit: Any = None, syscall: str = "?", args: tuple[int, ...] = ()):
        super().__init__(message, exit)
        self.syscall = syscall
        self.args_ = tuple(args)
