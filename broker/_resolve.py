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

import errno
import os
import stat
from typing import Any

from protocol import NotCapable, PolicyError, Rights
from protocol._paths import split_relative
from protocol._wire import KIND_DIR, KIND_FILE

from ._capability import Capability
from worker.sandbox._openat2 import openat2
from ._outputs import PendingOutput, make_output
from ._policy import Grant, Policy

_BASE = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_LISTDIR = 100_000
_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}


def access_flags(rights: Rights) -> int:
    """The open(2) access mode that ``rights`` allow (and no more)."""
    readable = bool(rights & Rights.READ)
    writable = bool(rights & (Rights.WRITE | Rights.APPEND))
    flags = os.O_RDWR if readable and writable else os.O_WRONLY if writable else os.O_RDONLY
    if rights & Rights.APPEND:
        flags |= os.O_APPEND
    return flags


def _kernel_denial(exc: OSError, display: str) -> Exception:
    if exc.errno in (errno.EXDEV, errno.ELOOP):
        return NotCapable("path escapes its granted directory (symlink, magic link or '..')", filename=display)
    if exc.errno == errno.EACCES or exc.errno == errno.EPERM:
        return NotCapable(os.strerror(exc.errno), errno=exc.errno, filename=display)
    exc.filename = display
    return exc


class Resolver:
    """Holds the root and granted-directory fds; turns requests into fds."""

    def __init__(self, policy: Policy, root: str | os.PathLike[str]):
        self.policy = policy
        self.root = os.fspath(root)
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dir_fds: dict[tuple[str, ...], int] = {}
        try:
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
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- internals --------------------------------------------------------
    def _locate(self, path: object, rights: Rights) -> tuple[Grant, int, str, str]:
        """Check a path and rights; return (grant, base fd, rest, display)."""
        parts = split_relative(path)
        display = "/".join(parts)
        grant, rest = self.policy.lookup(parts)
        extra = rights & ~grant.rights
        if extra:
            raise NotCapable(
                f"the policy grants {grant.rights.describe()} on {grant.display!r}, not {Rights(extra).describe()}",
                filename=display,
            )
        if grant.is_dir:
            return grant, self._dir_fds[grant.parts], "/".join(rest) or ".", display
        return grant, self._root_fd, display, display

    def _open_path(self, base: int, rest: str, display: str) -> tuple[int, os.stat_result]:
        try:
            fd = openat2(base, rest, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise _kernel_denial(exc, display) from exc
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _reopen(pathfd: int, flags: int, display: str) -> int:
        # Reopening through the O_PATH fd opens exactly the inode we checked.
        try:
            return os.open(f"/proc/self/fd/{pathfd}", flags)
        except OSError as exc:
            raise _kernel_denial(exc, display) from exc

    # -- requests ---------------------------------------------------------
    def open(self, path: object, rights: Rights) -> Capability:
        """A regular file, opened with the access mode ``rights`` allow."""
        _, base, rest, display = self._locate(path, rights)
        pathfd, st = self._open_path(base, rest, display)
        try:
            if not stat.S_ISREG(st.st_mode):
                kind = _TYPES.get(stat.S_IFMT(st.st_mode), "special file")
                raise NotCapable(f"only regular files are granted, this is a {kind}", filename=display)
            fd = self._reopen(pathfd, access_flags(rights) | _BASE, display)
        finally:
            os.close(pathfd)
        return Capability(fd, rights, KIND_FILE, display)

    def opendir(self, path: object, rights: Rights) -> Capability:
        _, base, rest, display = self._locate(path, rights)
        pathfd, st = self._open_path(base, rest, display)
        try:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", display)
            fd = self._reopen(pathfd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, display)
        finally:
            os.close(pathfd)
        return Capability(fd, rights, KIND_DIR, display)

    def stat(self, path: object) -> dict[str, Any]:
        _, base, rest, display = self._locate(path, Rights.FSTAT)
        pathfd, st = self._open_path(base, rest, display)
        os.close(pathfd)
        return {
            "type": _TYPES.get(stat.S_IFMT(st.st_mode), "other"),
            "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode),
            "mtime_ns": st.st_mtime_ns,
        }

    def listdir(self, path: object) -> list[str]:
        _, base, rest, display = self._locate(path, Rights.READ)
        pathfd, st = self._open_path(base, rest, display)
        try:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", display)
            fd = self._reopen(pathfd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, display)
        finally:
            os.close(pathfd)
        names: list[str] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        entry.name.encode("utf-8")
                    except UnicodeEncodeError:
                        continue  # not representable on the wire; never guessed at
                    names.append(entry.name)
                    if len(names) > _MAX_LISTDIR:
                        raise OSError(errno.E2BIG, f"more than {_MAX_LISTDIR} entries", display)
        finally:
            os.close(fd)
        return sorted(names)

    def create(self, path: object, rights: Rights) -> tuple[PendingOutput, Capability]:
        """An output file, written through a temporary and committed later."""
        parts = split_relative(path)
        if not parts:
            raise NotCapable("create() needs a file name", filename="")
        rights = rights | Rights.WRITE
        grant, base, rest, display = self._locate(path, rights | Rights.CREATE)
        if not grant.is_dir:
            raise NotCapable("create() needs a directory grant with CREATE", filename=display)
        parent, _, name = rest.rpartition("/")
        if name in (".", ""):
            raise NotCapable("create() needs a file name", filename=display)
        try:
            dirfd = openat2(base, parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _kernel_denial(exc, display) from exc
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        except BaseException:
            os.close(dirfd)
            raise
        if st is not None and not stat.S_ISREG(st.st_mode):
            os.close(dirfd)
            raise NotCapable("an output may only replace a regular file", filename=display)
        # O_TMPFILE needs a real directory fd, not O_PATH.
        try:
            realdir = os.open(f"/proc/self/fd/{dirfd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(dirfd)
        return make_output(realdir, name, rights & ~Rights.CREATE, display)
