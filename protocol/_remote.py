"""Exceptions across the wire: type name, message, errno and traceback text.

A remote exception maps back onto the real class when it is one of privsep's
or a builtin (``OSError`` subclasses included); anything else becomes a
:class:`RemoteError`. The worker's traceback is kept as
``remote_traceback`` and shown as a note.
"""

from __future__ import annotations

import builtins
import io
import traceback
from typing import Any

from . import _errors

# WorkerCrashed and its kind (PolicyViolation, WorkerTimeout) say how a worker
# ended, as the broker saw it: nothing sends them, so a worker naming one (to
# make a live worker's call read as a violation or a timeout) gets a RemoteError.
_OURS: dict[str, type[BaseException]] = {
    name: obj
    for name, obj in vars(_errors).items()
    if isinstance(obj, type) and issubclass(obj, _errors.PrivsepError) and not issubclass(obj, _errors.WorkerCrashed)
}
_BUILTIN_OK = {
    "ValueError", "TypeError", "KeyError", "IndexError", "LookupError", "RuntimeError",
    "NotImplementedError", "ArithmeticError", "ZeroDivisionError", "OverflowError",
    "AssertionError", "AttributeError", "UnicodeError", "MemoryError", "RecursionError",
    "EOFError", "BufferError", "Exception", "ImportError", "ModuleNotFoundError", "TimeoutError", "NameError",
    "SyntaxError",  # (xml.etree.ElementTree.ParseError is one)
}  # fmt: skip


def _nearest_known(exc: BaseException) -> str:
    """The closest ancestor class the other side can rebuild."""
    for klass in type(exc).__mro__:
        if klass.__name__ in _OURS or _local_class(klass.__name__) is klass:
            return klass.__name__
    return "Exception"


def exception_to_wire(exc: BaseException, with_traceback: bool = True) -> dict[str, Any]:
    """The wire form of ``exc``. Never raises for the exception's sake: a
    ``__str__`` that fails is reported as Python's own printer does."""
    try:
        tb = "".join(traceback.format_exception(exc)) if with_traceback else ""
    except Exception:  # (odd __notes__, a failing repr in a frame's line)
        tb = ""
    errno = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    filename = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    strerror = exc.strerror if isinstance(exc, OSError) else None
    try:
        if _is_plain_key_error(exc):
            msg = str.__str__(exc.args[0])  # the key itself: str() would quote it, and the other side again
        else:
            msg = str.__str__(str(exc) if strerror is None else str(strerror))  # exact str: no subclass code below
    except Exception:
        msg = "<exception str() failed>"
    return {
        # Each field bounded, so that any error fits one packet (the broker refuses blobs in one).
        "type": type(exc).__name__[:_MAX_NAME],
        "msg": msg[:4096],
        "errno": errno if type(errno) is int and -(1 << 31) <= errno < (1 << 31) else None,
        "filename": filename[:4096] if isinstance(filename, str) else None,
        "tb": tb[-32768:],
        "base": _nearest_known(exc),
    }


def _is_plain_key_error(exc: BaseException) -> bool:
    return (
        isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__
        and len(exc.args) == 1 and isinstance(exc.args[0], str)
    )


# Not a builtin, but what a file without SEEK or WRITE raises in a worker: an
# OSError and a ValueError at once, which no one builtin base would say.
_STDLIB_OK: dict[str, type[BaseException]] = {"UnsupportedOperation": io.UnsupportedOperation}


# Builtins whose constructor wants more than a message (encoding, object, positions): they come
# back as a RemoteError that is also one of them (see _remote_unicode_error), so that `except
# UnicodeDecodeError` catches a worker's (it came back as a UnicodeError only; user trial 16).
_UNICODE: dict[str, type[UnicodeError]] = {
    c.__name__: c for c in (UnicodeDecodeError, UnicodeEncodeError, UnicodeTranslateError)
}


def _local_class(name: str) -> type[BaseException] | None:
    if name in _OURS:
        return _OURS[name]
    if name in _STDLIB_OK:
        return _STDLIB_OK[name]
    if name in _UNICODE:
        return _UNICODE[name]
    obj = getattr(builtins, name, None)
    if isinstance(obj, type) and (issubclass(obj, OSError) or name in _BUILTIN_OK):
        return obj
    return None


_MAX_NAME = 256
_remote_classes: dict[tuple[str, type[BaseException]], type[_errors.RemoteError]] = {}
#: Classes kept for reuse. Names come from the worker: a compromised one
#: raising a new name per call must not grow the broker without bound
#: (20,000 names cost 35 MB); past this many, each is made afresh and goes
#: with its exception.
MAX_REMOTE_CLASSES = 512


def _message_only(self: _errors.RemoteError) -> str:
    return self.remote_message


def _remote_subclass(name: str, base: type[BaseException]) -> type[_errors.RemoteError]:
    """``RemoteError`` that is also a ``base``: ``except ValueError`` (or
    ``except OSError``) still catches a worker's subclass of it. Names are
    only labels."""
    key = (name, base)
    cls = _remote_classes.get(key)
    if cls is None:
        label = name if name.isidentifier() else "RemoteException"
        # Named as the worker's class, so its str() is the message alone, as the
        # original's was: "JSONDecodeError: JSONDecodeError: ..." said the name twice.
        cls = type(label, (_errors.RemoteError, base), {"__module__": _errors._REMOTE_MODULE, "__str__": _message_only})
        if len(_remote_classes) < MAX_REMOTE_CLASSES:
            _remote_classes[key] = cls
    return cls


def _remote_unicode_error(cls: type[_errors.RemoteError], name: str, msg: str, tb: str) -> _errors.RemoteError:
    """A ``RemoteError`` that is also a ``UnicodeDecodeError`` (or encode,
    translate) error. Its encoding, object and positions do not travel, its
    message does: they are set to "", an empty object and 0, and ``str()``
    is the worker's message."""
    kind = next(k for k in cls.__mro__ if k in _UNICODE.values())
    empty: bytes | str = b"" if kind is UnicodeDecodeError else ""
    exc = cls.__new__(cls)
    kind.__init__(exc, *(() if kind is UnicodeTranslateError else ("",)), empty, 0, 0, msg)  # type: ignore[misc]
    exc.type_name, exc.remote_message, exc.remote_traceback = name, msg, tb
    return exc


def _remote_os_error(cls: type[_errors.RemoteError], name: str, msg: str, tb: str, errno: int | None,
                     filename: str | None) -> _errors.RemoteError:
    """A ``RemoteError`` that is also an ``OSError`` subclass (a worker's own
    ``io.UnsupportedOperation``, say), with its errno and filename.
    OSError's constructor reads its arguments as (errno, strerror, filename):
    the instance is made with those, and RemoteError's fields set after."""
    args: tuple[Any, ...] = (msg,) if errno is None else (errno, msg, *(() if filename is None else (filename,)))
    exc = cls.__new__(cls, *args)
    OSError.__init__(exc, *args)
    exc.type_name, exc.remote_message, exc.remote_traceback = name, msg, tb
    return exc


def exception_from_wire(err: dict[str, Any]) -> BaseException:
    """Rebuild an exception from its wire form. Never evaluates anything.
    Its text is held to the bounds an honest sender keeps (a worker's may be
    64 MiB, and a name is kept with its class)."""
    name, msg, tb = err["type"][:_MAX_NAME], err["msg"][:4096], err["tb"][-32768:]
    cls = _local_class(name)
    exc: BaseException
    if cls is None:
        base = _local_class(err.get("base") or "")
        if base is None or base in (Exception, BaseException) or issubclass(base, _errors.PrivsepError):
            exc = _errors.RemoteError(name, msg, tb)
        elif issubclass(base, OSError):
            exc = _remote_os_error(_remote_subclass(name, base), name, msg, tb, err["errno"], err["filename"])
        elif base in _UNICODE.values():
            exc = _remote_unicode_error(_remote_subclass(name, base), name, msg, tb)
        else:
            exc = _remote_subclass(name, base)(name, msg, tb)
    elif cls in _UNICODE.values():
        exc = _remote_unicode_error(_remote_subclass(name, cls), name, msg, tb)
    elif issubclass(cls, _errors.NotCapable):
        exc = cls(msg, err["errno"] or 13, err["filename"])
    elif issubclass(cls, OSError):
        if err["errno"] is not None:
            exc = cls(err["errno"], msg, *([err["filename"]] if err["filename"] is not None else []))
        else:
            exc = cls(msg)
    elif issubclass(cls, _errors.RemoteError):
        exc = _errors.RemoteError(name, msg, tb)
    else:
        try:
            exc = cls(msg) if msg else cls()  # (a bare `raise KeyError` stays bare)
        except Exception:
            exc = _errors.RemoteError(name, msg, tb)
    exc.remote_traceback = tb  # type: ignore[attr-defined]
    if tb:
        exc.add_note("Traceback in the worker:\n" + tb.rstrip())
    return exc
