"""``self.broker``: the worker's way to ask the broker for resources.

Each method checks its arguments locally for a clear early error, then asks
the broker, which checks everything again against its policy. Denials raise
:class:`protocol.NotCapable`.
"""

from __future__ import annotations

import itertools
import os
import stat as _stat
import threading
from dataclasses import dataclass
from typing import IO, Any

from protocol import ProtocolError, Rights
from protocol._messages import check_message
from protocol._paths import local_path, split_relative
from protocol._remote import exception_from_wire
from protocol._rights import rights_arg
from protocol._wire import Channel, DirRef, ReceivedFd, type_name

from ._files import Directory, ProxyDirectory, make_dirs, wrap_received

_REPLIES = frozenset({"rep", "rerr", "stop"})


def _checked(path: str | os.PathLike[str]) -> str:
    """The path as the str sent, checked here for an early, clear error."""
    path = local_path(path)
    split_relative(path)
    return path


class BrokerGone(SystemExit):
    """The broker closed the channel or asked the worker to stop."""


@dataclass(frozen=True)
class StatResult:
    """What ``stat()`` returns: no inode numbers, owners or devices."""

    type: str  # "file", "dir", "symlink", "fifo", "socket", "char", "block", "other"
    size: int
    mode: int
    mtime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> StatResult:
        return cls(type_name(st.st_mode), st.st_size, _stat.S_IMODE(st.st_mode), st.st_mtime_ns)


class BrokerClient:
    """Requests from a worker to its broker, while an ``@rpc`` call runs.

    Any thread of the worker may ask; requests go one at a time (each waits
    for its answer). Outside a call the broker is not listening: a request
    then raises ``RuntimeError``, and a call does not answer until a request
    in flight on another thread has its reply.
    """

    def __init__(self, chan: Channel):
        self._chan = chan
        self._ids = itertools.count(1)
        self._created: list[IO[bytes]] = []  # outputs of the current call, closed when it ends
        self._lock = threading.Lock()  # one request on the channel at a time
        self._in_call = False
        # A thread other than the one that made us has asked: from then on a
        # call's end waits for the lock. (Set before the lock is taken, so a
        # call that ends after a thread's check of _in_call sees it.)
        self._threaded = False
        self._owner = threading.get_ident()
        self._to_release: list[int] = []  # directory proxies closed outside a call: let go at the next request

    def _request(self, op: str, **args: Any) -> Any:
        if not self._threaded and threading.get_ident() != self._owner:
            self._threaded = True
        with self._lock:
            if not self._in_call:
                raise RuntimeError("self.broker answers only while an @rpc call runs (in setup() or after the "
                                   "call has returned, nobody is listening)")
            while self._to_release:
                self._exchange("dclose", {"dir": self._to_release.pop()})  # (its answer matters to nobody)
            msg = self._exchange(op, args)
        if msg["t"] == "rerr":
            raise exception_from_wire(msg["e"])
        return msg["v"]

    def _exchange(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send one request and take its reply (holding the lock, in a call)."""
        rid = next(self._ids)
        self._chan.send({"t": "req", "id": rid, "op": op, "a": args})
        msg = self._chan.recv()
        if msg is None:
            raise BrokerGone(0)
        check_message(msg, _REPLIES)
        if msg["t"] == "stop":
            raise BrokerGone(0)
        if msg["id"] != rid:
            raise ProtocolError("reply to a request that was not made")
        return msg

    def _release_dir(self, ident: int) -> None:
        """Let the broker go of a directory proxy this worker asked for: now if
        a call runs, else with the next request."""
        try:
            self._request("dclose", dir=ident)
        except RuntimeError:  # outside a call
            self._to_release.append(ident)

    def _fd_request(self, op: str, args: dict[str, Any]) -> Any:
        value = self._request(op, **args)
        if isinstance(value, DirRef):
            return ProxyDirectory(self, value)
        if not isinstance(value, ReceivedFd):
            raise ProtocolError(f"broker answered '{op}' without a file descriptor")
        return wrap_received(value)

    @staticmethod
    def _stat(value: Any) -> StatResult:
        if not isinstance(value, dict):
            raise ProtocolError("bad stat reply")
        return StatResult(type=value["type"], size=value["size"], mode=value["mode"], mtime_ns=value["mtime_ns"])

    def _listing(self, op: str, **args: Any) -> list[str]:
        """A listing, page by page (one packet each; see broker._page)."""
        names: list[str] = []
        at = 0
        while True:
            value = self._request(op, at=at, **args)
            if (
                not isinstance(value, dict)
                or value.keys() != {"names", "next"}
                or not isinstance(value["names"], list)
                or not all(isinstance(x, str) for x in value["names"])
                or type(value["next"]) is not int
                or not (value["next"] == 0 or value["next"] > at)
            ):
                raise ProtocolError("bad listdir reply")
            names += value["names"]
            if not value["next"]:
                return names
            at = value["next"]

    def open(self, path: str | os.PathLike[str], rights: Rights = Rights.READ) -> IO[bytes]:
        """Open a file the policy grants. Returns a binary file object whose
        mode follows ``rights`` (READ: reader, WRITE: writer, both: r+b).
        Without SEEK (or FSTAT) it is a pipe the broker fills from the file."""
        path = _checked(path)
        return self._fd_request("open", {"path": path, "rights": int(rights_arg(rights))})

    def create(self, path: str | os.PathLike[str], rights: Rights = Rights.WRITE) -> IO[bytes]:
        """Create an output file. Returns a writable binary file.

        With the default rights the file is a pipe the broker drains into a
        hidden temporary file of its own (with ``SEEK|FSTAT`` too, that
        temporary file itself); the broker moves its content into place as
        ``path`` only when the current call returns normally; if the call
        raises or the worker dies, nothing is left behind. The file is closed
        when the call returns. One call creates ``path`` once. Without
        ``FTRUNCATE`` in ``rights`` the file cannot be truncated (``EACCES``
        on the file itself, ``EINVAL`` on the default pipe).
        """
        path = _checked(path)
        f = self._fd_request("create", {"path": path, "rights": int(rights_arg(rights))})
        self._created.append(f)
        return f

    def opendir(self, path: str | os.PathLike[str], rights: Rights = Rights.LOOKUP) -> Directory:
        """A directory beneath a granted one, resolved by the broker."""
        path = _checked(path)
        d = self._fd_request("opendir", {"path": path, "rights": int(rights_arg(rights))})
        if not isinstance(d, Directory):
            raise ProtocolError("broker answered 'opendir' without a directory")
        return d

    def stat(self, path: str | os.PathLike[str]) -> StatResult:
        path = _checked(path)
        return self._stat(self._request("stat", path=path))

    def listdir(self, path: str | os.PathLike[str] = "") -> list[str]:
        path = _checked(path)
        return self._listing("listdir", path=path)

    def mkdir(self, path: str | os.PathLike[str], *, parents: bool = False, exist_ok: bool = False) -> None:
        """Make a directory beneath a grant with MKDIRAT. ``parents`` and
        ``exist_ok`` as ``pathlib.Path.mkdir`` has them (one request a level;
        ``exist_ok`` needs FSTAT to see that what exists is a directory; the
        broker looks, so an existing directory is a granted request)."""
        path = _checked(path)
        make_dirs(lambda p, ok: self._request("mkdir", path=p, exist_ok=ok), path.rstrip("/"), parents, exist_ok)

    def _end_call(self) -> None:
        created, self._created = self._created, []
        for f in created:
            try:
                f.close()
            except OSError:
                pass
