"""Resolving worker requests beneath granted directories.

Every path is checked as text first (no absolute, no ``..``, no NUL) and
then resolved in the kernel with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS)`` beneath the granted directory's fd, so symlinks
that lead out and ``/proc`` magic links fail there. Objects are first
opened ``O_PATH`` and type-checked; only regular files (or directories,
where asked) are then reopened for I/O, so opening a FIFO or a device never
happens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from protocol import NotCapable, PolicyError, Rights
from protocol._paths import ESCAPES, is_utf8, split_relative
from protocol._wire import KIND_DIR, KIND_FILE, type_name
from worker._files import access_flags
from worker.sandbox._openat2 import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS
from worker.sandbox._openat2 import openat2 as _linux_openat2

from ._capability import Capability
from ._outputs import REMOVED, PendingOutput, make_output, removed
from ._policy import Policy, lacks

_BASE = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_LISTDIR = 100_000
# Accepted policy checks remembered (see Resolver.locate): at most this many, for paths up to
# this long, so a worker sending endless distinct paths costs the broker at most 1.7 MB
# (measured with tracemalloc, every path 256 four-byte characters).
_LOCATED_MAX = 512
_LOCATED_PATH_MAX = 256

__all__ = ["Resolver", "Target", "access_flags"]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, *, no_symlinks: bool = False) -> int:
    """Open beneath ``dirfd``: openat2(RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS)
    on Linux, openat(O_RESOLVE_BENEATH) on FreeBSD (untested in CI).
    ``no_symlinks``: a symlink anywhere on the path fails (ELOOP)."""
    if _FREEBSD:
        from ._resolve_freebsd import openat_beneath

        if no_symlinks:
            return _walk_no_symlinks(dirfd, path, flags, mode, openat_beneath)
        return openat_beneath(dirfd, path, flags, mode)
    if no_symlinks:
        return _linux_openat2(dirfd, path, flags, mode, _NO_SYMLINKS)
    return _linux_openat2(dirfd, path, flags, mode)


_NO_SYMLINKS = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS


def _walk_no_symlinks(dirfd: int, path: str, flags: int, mode: int, opener: Callable[..., int]) -> int:
    """RESOLVE_NO_SYMLINKS by hand, where the kernel has no such flag: each
    component opened O_PATH|O_NOFOLLOW (a symlink opens as itself) and
    checked, the last one then opened with ``flags`` beneath its parent."""
    parts = path.split("/")
    cur = dirfd
    try:
        for i, part in enumerate(parts):
            fd = opener(cur, part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                link = stat.S_ISLNK(os.fstat(fd).st_mode)
            except BaseException:
                os.close(fd)
                raise
            if link or i == len(parts) - 1:
                os.close(fd)
                if link:
                    raise OSError(errno.ELOOP, "a symlink on the path", path)
                return int(opener(cur, part, flags | os.O_NOFOLLOW, mode))
            if cur != dirfd:
                os.close(cur)
            cur = fd
    finally:
        if cur != dirfd:
            os.close(cur)
    raise OSError(errno.ENOENT, "empty path", path)


_FREEBSD = sys.platform.startswith("freebsd")


def _kernel_denial(exc: OSError, display: str, base: int = -1, in_dir: bool = True) -> Exception:
    if exc.errno == errno.ENOENT and base >= 0 and removed(base):
        return FileNotFoundError(errno.ENOENT, REMOVED, display)
    if exc.errno == errno.ELOOP and not in_dir:
        return NotCapable(_FILE_GRANT_SYMLINK, filename=display)
    if exc.errno in (errno.EXDEV, errno.ELOOP):
        return NotCapable(ESCAPES, filename=display)
    if exc.errno == errno.EACCES or exc.errno == errno.EPERM:
        return NotCapable(os.strerror(exc.errno), errno=exc.errno, filename=display)
    return type(exc)(exc.errno, exc.strerror, display)  # (a new one: raised "from exc", not from itself)


# The policy named this very path: no symlink on it is followed, not even one staying beneath the root
# (a symlink planted there would hand out a file the policy never named).
_FILE_GRANT_SYMLINK = "a single-file grant follows no symlink: the path must name the file itself"
_DIR_WRITES = Rights.CREATE | Rights.MKDIRAT | Rights.UNLINKAT | Rights.WRITE | Rights.APPEND | Rights.RENAMEAT
_WRITE_SYMLINK = "a file is created, unlinked or made a directory through no symlink: a directory on the path is one"


class Target(NamedTuple):
    """A checked request: resolve ``rest`` beneath ``base``. (Immutable; a
    NamedTuple is made in a third of a frozen dataclass's time.)"""

    base: int
    rest: str  # "." for the granted directory itself
    display: str
    in_dir: bool  # beneath a directory grant (else: a single-file grant)
    granted: Rights


class Resolver:
    """Holds the root and granted-directory fds; turns requests into fds."""

    def __init__(self, policy: Policy, root: str | os.PathLike[str]):
        self.policy = policy
        self.root = os.fspath(root)
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd_dir_fd, self._fd_dir_pid = -1, -1
        self._fd_dir_lock = threading.Lock()
        self._dir_fds: dict[tuple[str, ...], int] = {}
        self._located: dict[tuple[str, int], Target] = {}
        self._closed = False
        try:
            if not _FREEBSD:
                with contextlib.suppress(OSError):  # no /proc: grants fail later, saying so
                    self._fd_dir()  # opened now: a Broker's fds are all there once it is made
            for g in policy.grants:
                if g.is_dir and g.parts not in self._dir_fds:
                    try:
                        self._dir_fds[g.parts] = openat2(
                            self._root_fd, "/".join(g.parts) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
                        )
                    except OSError as exc:
                        raise PolicyError(
                            f"granted directory {g.display!r} cannot be opened beneath {self.root!r}: {exc.strerror}"
                        ) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        # Before the fds its targets name are closed (and their numbers reused); a check
        # finishing in another thread meanwhile may still add one, which is never read:
        # locate() refuses from now on.
        self._closed = True
        self._located.clear()
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        if self._fd_dir_fd >= 0:
            fd, self._fd_dir_fd = self._fd_dir_fd, -1
            os.close(fd)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):  # its broker was dropped unclosed: the fds go with it
            with contextlib.suppress(OSError):
                self.close()

    # -- locating ---------------------------------------------------------
    def locate(self, path: object, rights: Rights) -> Target:
        """Check a worker path against the policy.

        An accepted check is remembered: its answer depends on nothing but the
        path and the rights, since the policy is immutable and the grant fds
        stay the same until close(), which forgets them all. A refusal is
        checked again each time. (In a pinned loop of worker opens, a repeat
        check cost about 3 us, most of it cache misses after the switch from
        the worker.)"""
        if self._closed:
            raise NotCapable("the broker is closed")
        if type(path) is str:
            key = (path, int(rights))
            hit = self._located.get(key)
            if hit is not None:
                return hit
            target = self._locate(path, rights)
            if len(path) <= _LOCATED_PATH_MAX:
                if len(self._located) >= _LOCATED_MAX:
                    self._located.clear()  # many distinct paths: start over, keep the bound
                self._located[key] = target
            return target
        return self._locate(path, rights)

    def _locate(self, path: object, rights: Rights) -> Target:
        parts = split_relative(path)
        display = "/".join(parts)
        grant, rest = self.policy.lookup(parts, rights)
        if grant.is_dir:
            return Target(self._dir_fds[grant.parts], "/".join(rest) or ".", display, True, grant.rights)
        return Target(self._root_fd, display, display, False, grant.rights)

    def locate_in(self, directory: Capability, path: object, rights: Rights) -> Target:
        """Check a path beneath a directory capability (a directory proxy)."""
        parts = split_relative(path)
        display = "/".join(p for p in (directory.name, *parts) if p)  # (the root's own name is "")
        if int(rights) & ~int(directory.rights):
            raise NotCapable(lacks(f"directory {directory.name!r}", directory.rights, rights), filename=display)
        return Target(directory.fileno(), "/".join(parts) or ".", display, True, directory.rights)

    # -- internals --------------------------------------------------------
    def _open_path(self, t: Target, *, no_symlinks: bool = False) -> tuple[int, os.stat_result]:
        try:
            fd = openat2(t.base, t.rest, os.O_PATH | os.O_CLOEXEC, no_symlinks=no_symlinks or not t.in_dir)
        except OSError as exc:
            if no_symlinks and t.in_dir and exc.errno == errno.ELOOP:
                raise NotCapable(_WRITE_SYMLINK, filename=t.display) from exc
            raise _kernel_denial(exc, t.display, t.base, t.in_dir) from exc
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def _reopen(self, pathfd: int, flags: int, display: str) -> int:
        # Reopening through the O_PATH fd opens exactly the inode we checked.
        try:
            if _FREEBSD:
                return os.open(f"/proc/self/fd/{pathfd}", flags)
            return os.open(str(pathfd), flags, dir_fd=self._fd_dir())
        except OSError as exc:
            raise _kernel_denial(exc, display) from exc

    def after_fork(self) -> None:
        """In a forked child: a lock another thread held at the fork stays held."""
        self._fd_dir_lock = threading.Lock()

    def _fd_dir(self) -> int:
        """This process's /proc/self/fd, opened once: a lookup of one name
        beneath it costs less than walking the whole path each time. A forked
        copy of the broker must not read its parent's fd table, so the
        directory is reopened when the pid changes."""
        pid = os.getpid()
        if self._fd_dir_pid == pid:
            return self._fd_dir_fd
        with self._fd_dir_lock:  # one swap; no thread has used the old fd (it would have come here first)
            if self._fd_dir_pid != pid:
                fresh = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                old, self._fd_dir_fd = self._fd_dir_fd, fresh
                self._fd_dir_pid = pid
                if old >= 0:
                    os.close(old)
            return self._fd_dir_fd

    def _dir_fd(self, t: Target, flags: int, *, no_symlinks: bool = False) -> int:
        pathfd, st = self._open_path(t, no_symlinks=no_symlinks)
        try:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", t.display)
            return self._reopen(pathfd, flags | os.O_DIRECTORY | os.O_CLOEXEC, t.display)
        finally:
            os.close(pathfd)

    # -- requests ---------------------------------------------------------
    def open(self, t: Target, rights: Rights) -> Capability:
        """A regular file, opened with the access mode ``rights`` allow."""
        pathfd, st = self._open_path(t)
        try:
            if not stat.S_ISREG(st.st_mode):
                kind = type_name(st.st_mode, "special file")
                raise NotCapable(f"only regular files are granted, this is a {kind}", filename=t.display)
            fd = self._reopen(pathfd, access_flags(rights) | _BASE, t.display)
        finally:
            os.close(pathfd)
        return Capability(fd, rights, KIND_FILE, t.display)

    def reopen(self, cap: Capability) -> Capability:
        """The file or directory of ``cap``, opened anew with its rights: an
        open file of its own (offset, status flags, a directory's position),
        not a second fd on ``cap``'s, as a dup would be."""
        if cap.kind == KIND_DIR:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        elif cap.kind == KIND_FILE:
            flags = access_flags(cap.rights) | _BASE
        else:
            raise ValueError(f"only files and directories are opened anew, not {cap!r}")
        return Capability(self._reopen(cap.fileno(), flags, cap.name), cap.rights, cap.kind, cap.name)

    def opendir(self, t: Target, rights: Rights) -> Capability:
        """A directory capability. One that may be written in (create, make a
        directory, unlink) is reached through no symlink, as a write's path
        is (``_parent_and_name``): a proxy of ``out/h/sub -> ..`` would
        otherwise create in ``out/`` what it names ``out/h/sub/x``."""
        if not t.in_dir:
            raise NotCapable("a single-file grant is not a directory", filename=t.display)
        writes = bool(rights & _DIR_WRITES)
        return Capability(self._dir_fd(t, os.O_RDONLY, no_symlinks=writes), rights, KIND_DIR, t.display)

    def stat(self, t: Target) -> dict[str, Any]:
        pathfd, st = self._open_path(t)
        os.close(pathfd)
        return {
            "type": type_name(st.st_mode),
            "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode),
            "mtime_ns": st.st_mtime_ns,
        }

    def listdir(self, t: Target, charge: Callable[[int], None] | None = None) -> list[str]:
        """The sorted names beneath ``t``. ``charge`` is told how many entries
        were read (those left out, and those of a listing cut short, too)."""
        fd = self._dir_fd(t, os.O_RDONLY)
        names: list[str] = []
        seen = 0
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    # Every entry read counts, those left out too: the bound is on the work
                    seen += 1
                    if seen > _MAX_LISTDIR:
                        raise OSError(errno.E2BIG, f"more than {_MAX_LISTDIR} entries", t.display)
                    if is_utf8(entry.name):  # (a name that is not cannot travel; never guessed at)
                        names.append(entry.name)
        finally:
            os.close(fd)
            if charge is not None:
                charge(seen)
        return sorted(names)

    def _parent_and_name(self, t: Target) -> tuple[int, str]:
        if not t.in_dir:
            raise NotCapable("needs a directory grant", filename=t.display)
        parent, _, name = t.rest.rpartition("/")
        if name in (".", ""):
            raise NotCapable("needs a name beneath the granted directory, not the directory itself",
                             filename=t.display)
        try:
            # No symlink on the way, not even one staying beneath the root: a worker that may write in
            # one part of a shared tree would redirect into another part the writes of a worker (or a
            # caller) that may write there.
            return openat2(t.base, parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, no_symlinks=True), name
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotCapable(_WRITE_SYMLINK, filename=t.display) from exc
            raise _kernel_denial(exc, t.display, t.base) from exc

    def create(self, t: Target, rights: Rights) -> tuple[PendingOutput, Capability]:
        """An output file, written through a temporary and committed later."""
        dirfd, name = self._parent_and_name(t)
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        except BaseException:
            os.close(dirfd)
            raise
        if st is not None and not stat.S_ISREG(st.st_mode):
            os.close(dirfd)
            raise NotCapable("an output may only replace a regular file", filename=t.display)
        # O_TMPFILE needs a real directory fd, not O_PATH.
        try:
            realdir = self._reopen(dirfd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, t.display)
        finally:
            os.close(dirfd)
        return make_output(realdir, name, rights & ~Rights.CREATE, t.display)

    def unlink(self, t: Target) -> None:
        dirfd, name = self._parent_and_name(t)
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", t.display)
            os.unlink(name, dir_fd=dirfd)
        except OSError as exc:  # (named as the worker asked, not by the last component)
            raise _kernel_denial(exc, t.display, dirfd) from exc
        finally:
            os.close(dirfd)

    def mkdir(self, t: Target) -> None:
        dirfd, name = self._parent_and_name(t)
        try:
            os.mkdir(name, 0o755, dir_fd=dirfd)
        except OSError as exc:
            raise _kernel_denial(exc, t.display, dirfd) from exc
        finally:
            os.close(dirfd)
