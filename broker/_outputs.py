"""Atomic outputs: a worker writes an anonymous temporary file; the broker
copies it into place with a rename only when the call succeeds.

The worker's fd points at an ``O_TMPFILE`` inode that has no name, so a crash
of the worker or of the broker leaves nothing on disk. On commit the broker
copies the content (in the kernel, ``copy_file_range``) into a hidden file of
its own and renames that over the target, so the worker cannot change an
output after it was committed. A call's outputs are all staged under hidden
names before the first is renamed (``commit_all``): one the worker makes
fail costs them all.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from typing import Any

from protocol import Rights

from ._capability import Capability
from ._signals import raised_by_a_signal_handler

#: How long the write pipes of a call's outputs may stay open once it has
#: answered (never past the call's own deadline). An honest worker closed
#: them all before its answer, so they are closed already; this moment is only
#: for a close that races the answer. A pipe still open after it was kept by
#: the worker: the call fails, and none of its outputs is committed.
KEPT_GRACE = 0.1

# fcntl(2): a read lease, taken only on a file nobody has open for writing (not in Python's fcntl module).
F_SETLEASE, F_RDLCK, F_UNLCK = 1024, 0, 2

#: Why a request beneath a directory that is no longer there fails.
REMOVED = ("its directory was removed after the broker opened it (the broker keeps the directory it "
           "opened, as a capability does: a new one by the same name is not it)")


def hidden_name(name: str, suffix: str = "") -> str:
    """A fresh hidden name beside ``name``: ``.{name}.privsep-{12 hex}``,
    within NAME_MAX (255 bytes) whatever ``name`` is."""
    return f".{cut(name, _KEPT)}.privsep-{secrets.token_hex(6)}{suffix}"


_KEPT = 200  # bytes of the name kept in a hidden name: 1 + 200 + 21 + 4 (".tmp") <= 255


def cut(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes as the filesystem gets it
    (``os.fsencode``), never inside a character."""
    if len(name) * 4 <= limit or len(os.fsencode(name)) <= limit:
        return name
    size = 0
    for i, ch in enumerate(name):
        size += len(os.fsencode(ch))
        if size > limit:
            return name[:i]
    return name


def removed(dirfd: int) -> bool:
    """Has the directory open as ``dirfd`` been removed (no name links to it)?"""
    try:
        return os.fstat(dirfd).st_nlink == 0
    except OSError:
        return False


class PendingOutput:
    """One ``create()`` awaiting the end of its call. Owns both fds."""

    def __init__(self, dirfd: int, name: str, tmpfd: int, display: str):
        self.dirfd = dirfd
        self.name = name
        self.tmpfd = tmpfd
        self.display = display
        self.drain: Any = None  # set when the worker writes through a pipe
        self.linkable = True  # an O_TMPFILE inode can be linked into place
        self.placed = False  # renamed into place by commit_all

    def stage(self) -> str:
        """Everything of the commit that the worker can make fail: the rest of
        the pipe, then the content under a hidden name of the broker's own,
        which is returned. Raises (leaving no hidden file) if it cannot be."""
        if self.drain is not None:
            try:
                self.drain.finish()
            except OSError as exc:
                why = f"output not committed: {exc.strerror}"
                raise OSError(exc.errno or errno.EIO, why, self.display) from exc
        hidden = hidden_name(self.name)
        try:
            if self.drain is not None and self.linkable:
                # The worker only ever held a pipe: nobody else can write
                # the file, so it is linked into place as it is.
                os.link(f"/proc/self/fd/{self.tmpfd}", hidden, dst_dir_fd=self.dirfd, follow_symlinks=True)
            else:
                # The worker may still hold its fd: copy, so a committed
                # output can no longer change under it.
                self._copy_to(hidden)
            if self._name_is_a_directory():  # (the rename would fail: found now, before any rename)
                raise IsADirectoryError(errno.EISDIR, "a directory has its name")
        except OSError as exc:
            self.unstage(hidden)
            raise self._failed(exc) from exc
        except BaseException:
            self.unstage(hidden)
            raise
        return hidden

    def place(self, hidden: str) -> None:
        """Rename the staged ``hidden`` file over the output's name."""
        try:
            os.rename(hidden, self.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        except OSError as exc:
            raise self._failed(exc) from exc

    def staged(self, hidden: str) -> bool:
        """Is the staged file still at its ``hidden`` name (not renamed yet)?"""
        try:
            os.stat(hidden, dir_fd=self.dirfd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def unstage(self, hidden: str) -> None:
        try:
            os.unlink(hidden, dir_fd=self.dirfd)
        except OSError:
            pass

    def _name_is_a_directory(self) -> bool:
        try:
            return stat.S_ISDIR(os.stat(self.name, dir_fd=self.dirfd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def _failed(self, exc: OSError) -> OSError:
        """``exc`` named after the output, not the hidden file or /proc."""
        why = REMOVED if removed(self.dirfd) else exc.strerror or str(exc)
        return type(exc)(exc.errno or errno.EIO, f"output not committed: {why}", self.display)

    def _copy_to(self, hidden: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        out = os.open(hidden, flags, 0o644, dir_fd=self.dirfd)
        try:
            size = os.fstat(self.tmpfd).st_size
            copy_data(self.tmpfd, out, size)
            os.ftruncate(out, size)  # (the holes after the last data: still holes)
        finally:
            os.close(out)

    def kept_open(self) -> bool:
        """Does anyone still hold this output's file open for writing? For a
        file delivered as itself, once its call has answered: the broker
        holds only a read-only fd of it by then, so a writer is the worker's.
        The kernel grants a read lease only on a file nobody has open for
        writing (F_SETLEASE, EAGAIN otherwise); where it grants none at all
        (fs.leases-enable=0, a filesystem without leases) it is not known, and
        this says False."""
        if self.drain is not None or self.tmpfd < 0:
            return False
        try:
            fcntl.fcntl(self.tmpfd, F_SETLEASE, F_RDLCK)
        except OSError as exc:
            return exc.errno == errno.EAGAIN
        fcntl.fcntl(self.tmpfd, F_SETLEASE, F_UNLCK)
        return False

    def discard(self) -> None:
        if self.drain is not None:
            self.drain.close()
        for attr in ("tmpfd", "dirfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src`` to the same offsets of
    ``dst``, data segments only: a hole (a sparse file's 1 byte written at
    its end, say) is skipped, not written out as zeros, and stays a hole
    once ``dst`` is truncated to ``size``. Where the filesystem cannot say
    where data is, all of it is copied."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
            end = min(size, os.lseek(src, start, os.SEEK_HOLE))
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # no data at or after offset: the rest is a hole
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start, end = offset, size  # no SEEK_DATA here: everything is data
        while start < end:
            n = os.copy_file_range(src, dst, end - start, start, start)
            if n == 0:
                return  # (the file shrank under us: the worker may still hold it)
            start += n
        offset = end


def commit_all(outputs: list[PendingOutput]) -> None:
    """Put a call's outputs in place: all of them, or none if the worker can
    make one fail. First each output's content is staged under a hidden name
    (the rest of its pipe read, the file linked or copied): only what the
    worker can make fail. Only if every one was staged are they renamed into
    place, one rename each; otherwise every hidden file is removed and the
    first failure raised. (The renames are not one atomic step: a failure of
    the filesystem between two of them leaves the earlier ones in place.)
    Every output is discarded at the end, whatever happened. An interrupt
    (a Ctrl-C) that comes once the renames have begun is raised once they
    are done: raised between two, it left a part of the call's outputs in
    place (a probe: 1 in 150 interrupted calls)."""
    hidden: list[str | None] = []
    interrupted: BaseException | None = None
    try:
        try:
            for out in outputs:
                hidden.append(out.stage())
        except OSError as exc:
            if raised_by_a_signal_handler(exc) and exc.__cause__ is not None:
                raise exc.__cause__  # (the program's own TimeoutError, not "output not committed")
            raise
        interrupted = _place_all(outputs, hidden)
    finally:
        for out, name in zip(outputs, hidden, strict=False):  # (hidden: those staged, None once renamed)
            if name is not None:
                out.unstage(name)
        for out in outputs:
            out.discard()
    if interrupted is not None:
        raise interrupted


def _place_all(outputs: list[PendingOutput], hidden: list[str | None]) -> BaseException | None:
    """Rename each staged output into place (``hidden[i]`` set to None once
    it is); what interrupted the renames, once they are all done. A filesystem
    error is raised at once. After an interrupt, an output whose hidden name
    is gone was renamed already (the interpreter raises it once the rename's
    syscall has returned)."""
    interrupted: BaseException | None = None
    i = 0
    while i < len(outputs):
        try:
            while i < len(outputs):
                out, name = outputs[i], hidden[i]
                assert name is not None
                if interrupted is None or out.staged(name):
                    out.place(name)
                out.placed = True
                hidden[i] = None  # (after the rename: a failed one leaves its hidden file to unstage)
                i += 1
        except OSError as exc:
            if raised_by_a_signal_handler(exc):  # (a TimeoutError of the program's: an interrupt too)
                interrupted = interrupted or (exc.__cause__ if exc.__cause__ is not None else exc)
                continue
            if interrupted is not None:
                raise interrupted from exc
            raise
        except BaseException as exc:
            interrupted = interrupted or exc
    return interrupted


def drain_failed(outputs: list[PendingOutput]) -> OSError | None:
    """Why a call failed whose output the broker stopped reading, when it
    did (the worker saw only a broken pipe): past ``Limits.file_size``, or
    the broker's write failed (a full disk, a quota, a read-only remount)."""
    for out in outputs:
        error = out.drain.error if out.drain is not None else None
        if error is None:
            continue
        if error.errno == errno.EFBIG:
            why = f"output not committed: it went past Limits.file_size ({out.drain.limit:,} bytes)"
        else:
            why = f"output not committed: {error.strerror or error}"
        return OSError(error.errno, why, out.display)
    return None


def all_closed(outputs: list[PendingOutput]) -> bool:
    """Has the worker closed every output: the pipes it writes through, and
    the files delivered as themselves?"""
    return all(out.drain.closed() if out.drain is not None else not out.kept_open() for out in outputs)


def kept(outputs: list[PendingOutput]) -> PendingOutput | None:
    """A file delivered as itself that the worker still holds open for writing."""
    return next((out for out in outputs if out.drain is None and out.kept_open()), None)


def make_output(dirfd: int, name: str, rights: Rights, display: str) -> tuple[PendingOutput, Capability]:
    """Create the temporary file for ``name`` in ``dirfd``. Takes ownership of
    ``dirfd``. Returns the pending output and the capability for the worker."""
    try:
        mode = os.O_RDWR if rights & Rights.READ else os.O_WRONLY
        try:
            tmp = os.open(".", os.O_TMPFILE | mode | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
            linkable = True
        except OSError as exc:
            if removed(dirfd):
                raise FileNotFoundError(errno.ENOENT, REMOVED, display) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                exc.filename = display
                raise
            # No O_TMPFILE on this filesystem: a hidden name, unlinked at once.
            hidden = hidden_name(name, ".tmp")
            tmp = os.open(hidden, os.O_CREAT | os.O_EXCL | mode | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dirfd)
            os.unlink(hidden, dir_fd=dirfd)
            linkable = False  # an unlinked ordinary file cannot get a name again
        # The broker keeps a read-only view of the same inode for the commit;
        # the worker's fd keeps exactly the access mode its rights allow.
        try:
            mine = os.open(f"/proc/self/fd/{tmp}", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(tmp)
            raise
    except BaseException:
        os.close(dirfd)
        raise
    pending = PendingOutput(dirfd, name, mine, display)
    pending.linkable = linkable
    return pending, Capability(tmp, rights, name=display)
