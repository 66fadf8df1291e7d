"""Turn received file descriptors into Python objects, and back.

A file passed to a worker arrives as a binary file object whose access mode
matches its rights: READ gives a reader, WRITE a writer, both a read/write
file, APPEND an appending writer. The object owns the fd. A directory grant
arrives as a :class:`Directory`: fd-backed when it was granted at spawn
(Landlock rules were made from it), a proxy resolved by the broker when it
was granted later.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from protocol import NotCapable, Rights
from protocol._paths import ESCAPES, is_utf8, local_path, split_relative
from protocol._rights import rights_arg
from protocol._wire import KIND_DIR, KIND_FILE, KIND_MEMFD, DirRef, ReceivedFd, kind_of_mode, type_name, unsendable

# (imported here, before any sandbox entry: an import after it is a file-system access, which stopped
# every worker whose own module did not happen to import it first, through `broker`; red-team round 36)
from .sandbox._openat2 import openat2

if TYPE_CHECKING:
    from ._client import BrokerClient, StatResult

_BASE = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


@functools.lru_cache(maxsize=256)
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


@functools.lru_cache(maxsize=256)
def access_flags(rights: Rights) -> int:
    """The open(2) access mode that ``rights`` allow (and no more)."""
    readable = bool(rights & Rights.READ)
    writable = bool(rights & (Rights.WRITE | Rights.APPEND))
    flags = os.O_RDWR if readable and writable else os.O_WRONLY if writable else os.O_RDONLY
    if rights & Rights.APPEND:
        flags |= os.O_APPEND
    return flags


def open_fd(fd: int, rights: Rights, kind: int = KIND_FILE, *, pinned: bool = False) -> IO[bytes]:
    """Wrap ``fd`` (ownership taken) in a binary file object for ``rights``.

    A ``pinned`` fd (a grant held since spawn) is never closed by the object:
    the filter forbids closing its slot, so ``with grant:`` or garbage
    collection must not try."""
    try:
        # An explicit buffer size: io.open would otherwise ask isatty() (an ioctl) to choose one.
        f = open(fd, mode_for(rights), io.DEFAULT_BUFFER_SIZE, closefd=not pinned)  # noqa: SIM115 - the caller's
    except BaseException:
        os.close(fd)
        raise
    try:
        f.rights = rights  # type: ignore[attr-defined]
        f._privsep_kind = kind  # type: ignore[attr-defined]  # what fd_of says when the file goes back
    except AttributeError:
        pass
    return f


class Directory:
    """A directory capability: open, create, list, stat, unlink and mkdir beneath
    it, never above it, with at most its rights."""

    rights: Rights

    def _check(self, rights: Rights, path: str | os.PathLike[str]) -> tuple[str, tuple[str, ...]]:
        """(the path as a str, its components), or NotCapable for a path or
        rights this directory cannot give."""
        path = local_path(path)
        parts = split_relative(path)
        extra = rights_arg(rights) & ~self.rights
        if extra:
            raise NotCapable(f"directory grant lacks {Rights(extra).describe()}", filename=path)
        return path, parts

    def open(self, path: str | os.PathLike[str], rights: Rights = Rights.READ) -> IO[bytes]:
        raise NotImplementedError

    def create(self, path: str | os.PathLike[str], rights: Rights = Rights.WRITE) -> IO[bytes]:
        raise NotImplementedError

    def listdir(self, path: str | os.PathLike[str] = "") -> list[str]:
        raise NotImplementedError

    def stat(self, path: str | os.PathLike[str]) -> StatResult:
        raise NotImplementedError

    def unlink(self, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError

    def mkdir(self, path: str | os.PathLike[str], *, parents: bool = False, exist_ok: bool = False) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FdDirectory(Directory):
    """A directory held since spawn. Lookups happen here, in the worker, with
    ``openat2(RESOLVE_BENEATH)``; Landlock enforces the rights in the kernel.
    Owns its fd."""

    def __init__(self, fd: int, rights: Rights, *, pinned: bool = False):
        self._fd = fd
        self.rights = rights
        self._pinned = pinned  # held since spawn: its slot is never closed

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed directory")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0 and not self._pinned:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def __privsep_fd__(self) -> tuple[int, int, Rights]:
        return self.fileno(), KIND_DIR, self.rights

    def _openat(self, path: str, flags: int, mode: int = 0) -> int:
        try:
            return openat2(self.fileno(), path or ".", flags, mode)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ELOOP):  # as the broker says it
                raise NotCapable(ESCAPES, filename=path) from exc
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise NotCapable(os.strerror(exc.errno), errno=exc.errno, filename=path) from exc
            raise

    def open(self, path: str | os.PathLike[str], rights: Rights = Rights.READ) -> IO[bytes]:
        path, _ = self._check(rights, path)
        fd = self._openat(path, access_flags(rights) | _BASE)
        try:
            mode = os.fstat(fd).st_mode
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(mode):
            # As the broker refuses one, in its words. (Only this client's rule: the open has
            # been made, and a compromised worker may make it too, within Landlock's rights.)
            os.close(fd)
            raise NotCapable(f"only regular files are granted, this is a {type_name(mode, 'special file')}",
                             filename=path)
        return open_fd(fd, rights)

    def create(self, path: str | os.PathLike[str], rights: Rights = Rights.WRITE) -> IO[bytes]:
        path, _ = self._check(rights | Rights.CREATE, path)
        flags = access_flags(rights | Rights.WRITE) | os.O_CREAT | os.O_EXCL | _BASE
        return open_fd(self._openat(path, flags, 0o644), rights | Rights.WRITE)

    def listdir(self, path: str | os.PathLike[str] = "") -> list[str]:
        path, _ = self._check(Rights.NONE, path)
        fd = self._openat(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return sorted(name for name in os.listdir(fd) if is_utf8(name))  # as the broker lists
        finally:
            os.close(fd)

    def stat(self, path: str | os.PathLike[str]) -> StatResult:
        from ._client import StatResult

        path, _ = self._check(Rights.NONE, path)
        fd = self._openat(path, os.O_PATH | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return StatResult.from_stat(st)

    def unlink(self, path: str | os.PathLike[str]) -> None:
        path, parts = self._check(Rights.UNLINKAT, path)
        if not parts:
            raise NotCapable("unlink needs a name", filename=path)
        parent = self._openat("/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.unlink(parts[-1], dir_fd=parent)
        finally:
            os.close(parent)

    def mkdir(self, path: str | os.PathLike[str], *, parents: bool = False, exist_ok: bool = False) -> None:
        path, parts = self._check(Rights.MKDIRAT, path)
        if not parts:
            raise NotCapable("mkdir needs a name", filename=path)
        make_dirs(self._mkdir_one, "/".join(parts), parents, exist_ok)

    def _mkdir_one(self, path: str, exist_ok: bool) -> None:
        parts = path.split("/")
        parent = self._openat("/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
        except FileExistsError:
            if not exist_ok or _type_of(self.stat, path) != "dir":
                raise
        finally:
            os.close(parent)


class ProxyDirectory(Directory):
    """A directory granted after entry: every operation is a request that
    the broker resolves beneath the real directory with openat2.

    One passed as a call's argument lives for that call, as file arguments
    do. One the worker asked for (``self.broker.opendir``) is ``owned``: the
    broker keeps it until ``close()`` (or ``with``) lets it go."""

    def __init__(self, client: BrokerClient, ref: DirRef, *, owned: bool = True):
        self._client = client
        self.id = ref.id
        self.rights = ref.rights
        self._owned = owned
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owned:
                self._client._release_dir(self.id)

    def _check(self, rights: Rights, path: str | os.PathLike[str]) -> tuple[str, tuple[str, ...]]:
        if self._closed:
            raise ValueError("I/O operation on closed directory")
        return super()._check(rights, path)

    def open(self, path: str | os.PathLike[str], rights: Rights = Rights.READ) -> IO[bytes]:
        path, _ = self._check(rights, path)
        return self._client._fd_request("dopen", {"dir": self.id, "path": path, "rights": int(rights_arg(rights))})

    def create(self, path: str | os.PathLike[str], rights: Rights = Rights.WRITE) -> IO[bytes]:
        path, _ = self._check(rights | Rights.CREATE, path)
        f = self._client._fd_request("dcreate", {"dir": self.id, "path": path, "rights": int(rights_arg(rights))})
        self._client._created.append(f)
        return f

    def listdir(self, path: str | os.PathLike[str] = "") -> list[str]:
        path, _ = self._check(Rights.NONE, path)
        return self._client._listing("dlist", dir=self.id, path=path)

    def stat(self, path: str | os.PathLike[str]) -> StatResult:
        path, _ = self._check(Rights.NONE, path)
        return self._client._stat(self._client._request("dstat", dir=self.id, path=path))

    def unlink(self, path: str | os.PathLike[str]) -> None:
        path, _ = self._check(Rights.UNLINKAT, path)
        self._client._request("dunlink", dir=self.id, path=path)

    def mkdir(self, path: str | os.PathLike[str], *, parents: bool = False, exist_ok: bool = False) -> None:
        path, parts = self._check(Rights.MKDIRAT, path)
        make_dirs(lambda p, ok: self._client._request("dmkdir", dir=self.id, path=p, exist_ok=ok),
                  "/".join(parts) or path, parents, exist_ok)  # fmt: skip

    def __repr__(self) -> str:
        return f"<ProxyDirectory {self.id} {self.rights.describe()}>"


def make_dirs(mkdir: Callable[[str, bool], Any], path: str, parents: bool, exist_ok: bool) -> None:
    """``pathlib.Path.mkdir(parents=, exist_ok=)`` made of one-level
    ``mkdir(path, exist_ok)`` requests (each checked, and audited, as any
    other; the broker answers ``exist_ok`` itself, so an existing directory
    is not a failed request in its audit). ``exist_ok`` holds for a
    directory only: a file of that name still raises. A loop, not a
    recursion: a path of 4096 bytes has about 2,000 levels, and 980 raised
    RecursionError (red-team round 37)."""
    missing: list[str] = []  # the levels not made yet, deepest first (the path itself first)
    while True:
        try:
            mkdir(path, True if missing else bool(exist_ok))  # (a bool on the wire, whatever the caller passed)
            break
        except FileNotFoundError:
            above = path.rsplit("/", 1)[0] if "/" in path else ""
            if not parents or not above:
                raise
            missing.append(path)
            path = above
    while missing:  # (a level gone again meanwhile raises, as os.makedirs does)
        level = missing.pop()
        mkdir(level, True if missing else bool(exist_ok))


def _type_of(stat: Callable[[str], Any], path: str) -> str | None:
    try:
        return str(stat(path).type)
    except OSError:  # (NotCapable: no FSTAT to look with)
        return None


def wrap_received(rfd: ReceivedFd) -> Any:
    """Take ownership of a received fd and return the matching object."""
    if rfd.kind == KIND_DIR:
        return FdDirectory(rfd.detach(), rfd.rights)
    return open_fd(rfd.detach(), rfd.rights, rfd.kind)


def fd_of(obj: Any) -> tuple[int, int, Rights]:
    """Describe a file object a worker returns, for sending it to the broker.

    The broker does not trust this description; it re-derives the rights
    from the fd itself.
    """
    if (type(obj) is io.BufferedReader or isinstance(obj, io.IOBase)) and not obj.closed:
        if type(obj) is not io.BufferedReader and isinstance(obj, _FLUSHED):
            obj.flush()
        try:
            fd = obj.fileno()
        except (io.UnsupportedOperation, ValueError):  # io.BytesIO, io.StringIO, a wrapped stream
            raise TypeError(
                f"cannot send a {type(obj).__name__} to the broker: it is no file descriptor (send its "
                "contents, getvalue() or read(), instead)"
            ) from None
        # A file privsep gave this worker knows its kind; any other is asked (a claim either way:
        # the broker derives kind and rights from the fd itself).
        kind = getattr(obj, "_privsep_kind", None)
        if kind is None:
            kind = kind_of_mode(os.fstat(fd).st_mode)
        return fd, kind, _RIGHTS_OF[bool(obj.readable()), bool(obj.writable())]
    if isinstance(obj, ProxyDirectory):
        raise TypeError("a directory proxy stands for a directory the broker holds: it cannot be sent back "
                        "(send the names beneath it instead)")
    raise unsendable(obj, "the broker")


_FLUSHED = (io.BufferedWriter, io.BufferedRandom)
_RIGHTS_OF = {
    (False, False): Rights.NONE,
    (True, False): Rights.READ,
    (False, True): Rights.WRITE,
    (True, True): Rights.READ | Rights.WRITE,
}


__all__ = [
    "KIND_MEMFD",
    "Directory",
    "FdDirectory",
    "ProxyDirectory",
    "access_flags",
    "fd_of",
    "mode_for",
    "open_fd",
    "wrap_received",
]
