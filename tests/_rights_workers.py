"""The worker classes of test_rights.py, in a module of their own: a zygote
imports a worker's module, and this one imports neither pytest nor the tests."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from typing import Any

from protocol import NotCapable, Rights
from worker import Directory, FdDirectory, Worker, rpc

FS_IOC_GETFLAGS = 0x80086601


def _fd(f: Any) -> int:
    return int(f.fileno())


OPS: dict[str, Callable[[Any], Any]] = {
    "READ": lambda f: os.read(_fd(f), 1),
    "WRITE": lambda f: os.write(_fd(f), b"x"),
    "SEEK": lambda f: os.lseek(_fd(f), 1, os.SEEK_SET),
    "FSTAT": lambda f: stat.S_ISREG(os.fstat(_fd(f)).st_mode) or "not the file",
    "FTRUNCATE": lambda f: os.ftruncate(_fd(f), 1),
    "FSYNC": lambda f: os.fsync(_fd(f)),
    "MMAP_R": lambda f: len(mmap.mmap(_fd(f), 1, prot=mmap.PROT_READ)),
    "MMAP_W": lambda f: len(mmap.mmap(_fd(f), 1, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)),
    "FCHMOD": lambda f: os.fchmod(_fd(f), 0o644),
    "FCHOWN": lambda f: os.fchown(_fd(f), -1, -1),
    "FLOCK": lambda f: fcntl.flock(_fd(f), fcntl.LOCK_SH | fcntl.LOCK_NB),
    "FUTIMES": lambda f: os.utime(_fd(f)),
    "FSTATFS": lambda f: os.fstatvfs(_fd(f)).f_bsize > 0,
    "FCNTL": lambda f: fcntl.fcntl(_fd(f), fcntl.F_SETFL, os.O_NONBLOCK),
    "IOCTL": lambda f: fcntl.ioctl(_fd(f), FS_IOC_GETFLAGS, b"\0" * 8) and True,
    "APPEND": lambda f: fcntl.fcntl(_fd(f), fcntl.F_SETFL, 0),  # try to clear O_APPEND
    # status flags of the open file, which the broker's capability shares
    "O_DIRECT": lambda f: fcntl.fcntl(_fd(f), fcntl.F_SETFL, os.O_APPEND | os.O_DIRECT),
}


class Prober(Worker):
    @rpc
    def probe(self, op: str, f: Any = None) -> dict[str, Any]:
        target = self.grants["f"] if f is None else f
        try:
            return {"ok": repr(OPS[op](target))}
        except OSError as exc:
            return {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}

    @rpc
    def dir_op(self, op: str, d: Any = None) -> dict[str, Any]:
        """Directory operations done raw, skipping the worker-side checks, as
        a compromised worker would: the kernel (spawn: Landlock) or the
        broker (later: the proxy) must stop them on its own."""
        directory: Directory = self.grants["d"] if d is None else d
        fd_backed = isinstance(directory, FdDirectory)
        client = self.broker
        rs = int(Rights.READ | Rights.SEEK | Rights.FSTAT)
        ws = int(Rights.WRITE | Rights.SEEK | Rights.FSTAT)
        try:
            if op in ("open", "escape"):
                name = "a.txt" if op == "open" else "../secret"
                if fd_backed:
                    fd = os.open(name, os.O_RDONLY, dir_fd=directory.fileno())
                    with os.fdopen(fd, "rb") as f:
                        return {"ok": f.read().decode()}
                with client._fd_request("dopen", {"dir": directory.id, "path": name, "rights": rs}) as f:
                    return {"ok": f.read().decode()}
            if op == "list":
                return {"ok": directory.listdir()}
            if op == "create":
                if fd_backed:
                    os.close(os.open("new.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=directory.fileno()))
                else:
                    client._fd_request("dcreate", {"dir": directory.id, "path": "new.txt", "rights": ws}).close()
                return {"ok": "created"}
            if op == "unlink":
                if fd_backed:
                    os.unlink("victim.txt", dir_fd=directory.fileno())
                else:
                    client._request("dunlink", dir=directory.id, path="victim.txt")
                return {"ok": "unlinked"}
        except NotCapable as exc:
            return {"denied": f"broker {errno.errorcode[exc.errno or 0]}"}
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            # (an escape by '..' from a grant held from spawn ends in the empty root: nothing there)
            denials = ("EACCES", "EXDEV", "EPERM", "ENOENT") if op == "escape" else ("EACCES", "EXDEV", "EPERM")
            return {"denied": f"kernel {name}"} if name in denials else {"errno": name}
        raise ValueError(op)


class Attacker(Prober):
    @rpc
    def reuse_slot(self, strong: Any) -> dict[str, str]:
        slot = self.grants["f"].fileno()
        out = {}
        for name, fn in (("close", lambda: os.close(slot)), ("dup2", lambda: os.dup2(strong.fileno(), slot))):
            try:
                fn()
                out[name] = "done"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno or 0]
        return out


class Mover(Worker):
    @rpc
    def move_and_look(self) -> dict[str, Any]:
        src, dst = self.grants["src"].fileno(), self.grants["dst"].fileno()
        os.rename("a.txt", "moved.txt", src_dir_fd=src, dst_dir_fd=dst)  # (Landlock REFER: one mount)
        seen: dict[str, Any] = {}
        for path in ("../secret", "../../../../../../../etc/passwd", "../out/moved.txt"):
            try:
                seen[path] = os.stat(path, dir_fd=src).st_size
            except OSError as exc:
                seen[path] = errno.errorcode[exc.errno or 0]
        return seen


class Looker(Worker):
    @rpc
    def look(self) -> dict[str, Any]:
        """Each grant's stat of a host file far above it (its size, or the errno)."""
        seen: dict[str, Any] = {}
        for name, grant in sorted(self.grants.items()):
            try:
                seen[name] = os.stat("../../../../../../../etc/passwd", dir_fd=grant.fileno()).st_size
            except OSError as exc:
                seen[name] = errno.errorcode[exc.errno or 0]
        return seen

    @rpc
    def create(self, grant: str) -> str:
        try:
            os.close(os.open("new.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=self.grants[grant].fileno()))
        except OSError as exc:
            return errno.errorcode[exc.errno or 0]
        return "created"


class Closer(Prober):
    @rpc
    def close_grant_politely(self) -> str:
        fd = self.grants["f"].fileno()
        with self.grants["f"] as f:  # closing the Python object must not close the pinned slot
            f.read(1)
        del f
        import gc

        gc.collect()
        return repr(os.pread(fd, 1, 1))
