"""The restricted opener: reopens files for the broker inside a Landlock
domain that handles TRUNCATE (and IOCTL_DEV) with no rule granting them.

Landlock fixes a file's truncate and device-ioctl rights when it is opened,
by the domain of the process that opens it. Files this process opens can
therefore never be truncated (``ftruncate`` -> EACCES), whoever holds them
later: that is how a worker can get a writable fd without FTRUNCATE after
its own sandbox was entered. The opener holds nothing but its channel and
the fds the broker sends for one request at a time.

Run as ``python3 -m worker._opener FD [--pdeathsig]``: the broker always
asks for the parent-death signal, since it starts the opener from a thread
that lives as long as its process (``broker._parent``; the kernel sends the
signal when the starting *thread* ends). EOF on the channel ends it too.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from protocol import Rights
from protocol._wire import KIND_FILE, Channel, ReceivedFd

from ._importpath import adopt_import_path
from ._serve import _close_all_but
from .sandbox import _landlock
from .sandbox._libc import PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, prctl

_ALLOWED_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_TMPFILE


class _Fd:
    def __init__(self, fd: int):
        self.fd = fd

    def __privsep_fd__(self) -> tuple[int, int, Rights]:
        return self.fd, KIND_FILE, Rights.NONE


def restrict() -> int:
    """Enter the domain: TRUNCATE (and IOCTL_DEV) handled, never granted."""
    abi = _landlock.abi_version()
    if abi < 3:
        raise SystemExit(f"the opener needs Landlock ABI >= 3 (truncate control); this kernel has {abi}")
    handled = _landlock.TRUNCATE | (_landlock.IOCTL_DEV if abi >= 5 else 0)
    attr = _landlock.ffi.new("struct privsep_landlock_ruleset_attr *")
    attr.handled_access_fs = handled
    ruleset = _landlock._sys(_landlock.SYS_CREATE_RULESET, attr, _landlock.attr_size(abi), 0)
    if ruleset < 0:
        raise SystemExit("landlock_create_ruleset failed")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    rc = _landlock._sys(_landlock.SYS_RESTRICT_SELF, ruleset, 0)
    os.close(ruleset)
    if rc != 0:
        raise SystemExit("landlock_restrict_self failed")
    return abi


def handle(msg: Any) -> dict[str, Any]:
    if (
        type(msg) is not dict
        or msg.get("t") != "open"
        or not isinstance(msg.get("fd"), ReceivedFd)
        or not isinstance(msg.get("flags"), int)
        or msg["flags"] & ~_ALLOWED_FLAGS
    ):
        if type(msg) is dict and isinstance(msg.get("fd"), ReceivedFd):
            msg["fd"].close()
        return {"t": "error", "errno": 22}
    src: ReceivedFd = msg["fd"]
    flags: int = msg["flags"] | os.O_CLOEXEC
    try:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            fd = os.open(".", flags, 0o600, dir_fd=src.fd)
        else:
            fd = os.open(f"/proc/self/fd/{src.fd}", flags)
    except OSError as exc:
        return {"t": "error", "errno": exc.errno or 5}
    finally:
        src.close()
    return {"t": "opened", "fd": _Fd(fd)}


def main(argv: list[str]) -> None:
    adopt_import_path()
    fd = int(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is the broker's to handle
    if "--pdeathsig" in argv[1:]:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # (a broker dead before this: EOF below)
    _close_all_but([0, 1, 2, fd])
    chan = Channel(socket.socket(fileno=fd))
    restrict()
    try:
        chan.send({"t": "ready"})
        while True:
            msg = chan.recv()
            if msg is None:
                os._exit(0)
            reply = handle(msg)
            chan.send(reply)
            if reply["t"] == "opened":
                os.close(reply["fd"].fd)
    except ConnectionError:  # the broker went away (ended by a signal, say): nothing to say on its stderr
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
