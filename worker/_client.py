"""``self.broker``: the worker's way to ask the broker for resources.

Each method checks its arguments locally for a clear early error, then asks
the broker, which checks everything again against its policy. Denials raise
:class:`protocol.NotCapable`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import IO, Any

from protocol import ProtocolError, Rights
from protocol._messages import check_message
from protocol._paths import split_relative
from protocol._remote import exception_from_wire
from protocol._wire import Channel, ReceivedFd

from ._files import Directory, wrap_received

_REPLIES = frozenset({"rep", "rerr", "stop"})


class BrokerGone(SystemExit):
    """The broker closed the channel or asked the worker to stop."""


@dataclass(frozen=True)
class StatResult:
    """What ``self.broker.stat()`` returns."""

    type: str  # "file", "dir", "symlink", "fifo", "socket", "char", "block"
    size: int
    mode: int
    mtime_ns: int


class BrokerClient:
    """Requests from a worker to its broker. Valid only inside an RPC call."""

    def __init__(self, chan: Channel):
        self._chan = chan
        self._ids = itertools.count(1)

    def _request(self, op: str, **args: Any) -> Any:
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
        if msg["t"] == "rerr":
            raise exception_from_wire(msg["e"])
        return msg["v"]

    def _fd_reply(self, op: str, path: str, rights: Rights) -> Any:
        split_relative(path)
        value = self._request(op, path=path, rights=int(Rights(rights)))
        if not isinstance(value, ReceivedFd):
            raise ProtocolError(f"broker answered '{op}' without a file descriptor")
        return wrap_received(value)

    def open(self, path: str, rights: Rights = Rights.READ) -> IO[bytes]:
        """Open a file the policy grants. Returns a binary file object whose
        mode follows ``rights`` (READ: reader, WRITE: writer, both: r+b)."""
        return self._fd_reply("open", path, rights)  # type: ignore[no-any-return]

    def create(self, path: str, rights: Rights = Rights.WRITE) -> IO[bytes]:
        """Create an output file. Returns a writable binary file.

        The broker gives a hidden temporary file and moves its content into
        place as ``path`` only when the current call returns normally; if the
        call raises or the worker dies, nothing is left behind.
        """
        return self._fd_reply("create", path, rights)  # type: ignore[no-any-return]

    def opendir(self, path: str, rights: Rights = Rights.LOOKUP) -> Directory:
        """Open a directory grant, for later lookups beneath it."""
        return self._fd_reply("opendir", path, rights)  # type: ignore[no-any-return]

    def stat(self, path: str) -> StatResult:
        split_relative(path)
        value = self._request("stat", path=path)
        if not isinstance(value, dict):
            raise ProtocolError("bad stat reply")
        return StatResult(type=value["type"], size=value["size"], mode=value["mode"], mtime_ns=value["mtime_ns"])

    def listdir(self, path: str = "") -> list[str]:
        split_relative(path)
        value = self._request("listdir", path=path)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ProtocolError("bad listdir reply")
        return value
