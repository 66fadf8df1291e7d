"""Human-readable violation reports: ``openat(AT_FDCWD, "/etc/passwd", ...)``.

String arguments are read from the blocked worker's memory through
``/proc/PID/mem`` *for the report only*; the decision never depends on them
(the worker could change them after the read).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from ._interp import import_entries

AT_FDCWD = -100
_MAX_STR = 200

# syscall -> indexes of its path (C string) arguments
_STRING_ARGS: dict[str, tuple[int, ...]] = {
    "open": (0,), "creat": (0,), "stat": (0,), "lstat": (0,), "access": (0,), "truncate": (0,),
    "chdir": (0,), "chmod": (0,), "chown": (0,), "lchown": (0,), "mkdir": (0,), "rmdir": (0,),
    "unlink": (0,), "readlink": (0,), "mknod": (0,), "execve": (0,), "uselib": (0,), "chroot": (0,),
    "rename": (0, 1), "link": (0, 1), "symlink": (0, 1), "openat": (1,), "openat2": (1,),
    "newfstatat": (1,), "statx": (1,), "faccessat": (1,), "faccessat2": (1,), "mkdirat": (1,),
    "unlinkat": (1,), "readlinkat": (1,), "fchmodat": (1,), "fchownat": (1,), "mknodat": (1,),
    "execveat": (1,), "renameat": (1, 3), "renameat2": (1, 3), "linkat": (1, 3), "symlinkat": (0, 2),
    "utimensat": (1,), "mount": (0, 1, 2), "umount2": (0,), "pivot_root": (0, 1),
    "setxattr": (0, 1), "getxattr": (0, 1), "name_to_handle_at": (1,),
}  # fmt: skip
_DIRFD_ARG0 = {"openat", "openat2", "newfstatat", "statx", "faccessat", "faccessat2", "mkdirat", "unlinkat",
               "readlinkat", "fchmodat", "fchownat", "mknodat", "execveat", "renameat", "renameat2",
               "linkat", "utimensat", "name_to_handle_at"}  # fmt: skip


# syscall -> (index of its struct sockaddr argument, index of that struct's length, argument count)
_SOCKADDR_ARGS: dict[str, tuple[int, int, int]] = {"connect": (1, 2, 3), "bind": (1, 2, 3), "sendto": (4, 5, 6)}
_MAX_SOCKADDR = 128  # sizeof(struct sockaddr_storage)


# Constants shown by name, as strace does: socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, ...), kill(..., SIGKILL).
_FAMILIES = {int(f): f.name for f in socket.AddressFamily if f.name in {
    "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_VSOCK", "AF_BLUETOOTH", "AF_ALG"}}
_SOCK_TYPES = {int(socket.SOCK_STREAM): "SOCK_STREAM", int(socket.SOCK_DGRAM): "SOCK_DGRAM",
               int(socket.SOCK_RAW): "SOCK_RAW", int(socket.SOCK_SEQPACKET): "SOCK_SEQPACKET"}  # fmt: skip
_SOCK_FLAGS = ((int(socket.SOCK_NONBLOCK), "SOCK_NONBLOCK"), (int(socket.SOCK_CLOEXEC), "SOCK_CLOEXEC"))
_ARITY = {"socket": 3, "socketpair": 4, "kill": 2, "tkill": 2, "tgkill": 3, "rt_sigqueueinfo": 3,
          "rt_tgsigqueueinfo": 4, "pidfd_send_signal": 4, "clock_gettime": 2, "clock_getres": 2,
          "clock_nanosleep": 4, "timer_create": 3}
_ARITY.update({"ptrace": 4, "process_vm_readv": 6, "process_vm_writev": 6, "pidfd_open": 2})
# linux/ptrace.h (the requests a compromised worker would try first)
_PTRACE_REQUESTS = {0: "PTRACE_TRACEME", 1: "PTRACE_PEEKTEXT", 2: "PTRACE_PEEKDATA", 4: "PTRACE_POKETEXT",
                    5: "PTRACE_POKEDATA", 12: "PTRACE_GETREGS", 13: "PTRACE_SETREGS", 16: "PTRACE_ATTACH",
                    17: "PTRACE_DETACH", 0x4206: "PTRACE_SEIZE", 0x4207: "PTRACE_INTERRUPT"}  # fmt: skip
_PID_ARG = {"ptrace": 1, "process_vm_readv": 0, "process_vm_writev": 0, "pidfd_open": 0}
_CLOCK_CALLS = frozenset({"clock_gettime", "clock_getres", "clock_nanosleep", "timer_create"})
_CPU_CLOCKS = ("PROF", "VIRT", "SCHED", "FD")  # (the registers past them hold what was left there)
_SIGNAL_ARG = {"kill": 1, "tkill": 1, "tgkill": 2, "rt_sigqueueinfo": 1, "rt_tgsigqueueinfo": 2, "pidfd_send_signal": 1}


def _named(name: str, i: int, value: int) -> str | None:
    """Argument ``i`` of ``name`` by its constant's name, where one is known."""
    if name in ("socket", "socketpair"):
        if i == 0:
            return _FAMILIES.get(value)
        if i == 1:
            kind = _SOCK_TYPES.get(value & 0xF)
            rest = value & ~0xF
            if kind is None:
                return None
            for bit, flag in _SOCK_FLAGS:
                if rest & bit:
                    kind, rest = f"{kind}|{flag}", rest & ~bit
            return kind if not rest else None
    if name in _CLOCK_CALLS and i == 0 and value & 0x80000000:  # (~pid << 3) | which, as an int
        clock = value - (1 << 32) if value < (1 << 32) else value - (1 << 64)
        whose = "thread" if clock & 4 else "process"
        return f"<{_CPU_CLOCKS[clock & 3]} CPU clock of {whose} {~(clock >> 3)}>"
    if name == "ptrace" and i == 0:
        return _PTRACE_REQUESTS.get(value)
    if _PID_ARG.get(name) == i:
        return _signed32(value)
    at = _SIGNAL_ARG.get(name)
    if at == i:
        if value & 0xFFFFFFFF == 0:
            return "0"  # (the probe of whether a process exists: no signal, and shown, never dropped as a 0x0)
        try:
            return signal.Signals(value & 0xFFFFFFFF).name
        except ValueError:
            return None
    if at is not None and i < at:
        return _signed32(value)
    return None


def _signed32(value: int) -> str:
    """A pid or tid, as the kernel reads it: an int, the register's low 32
    bits (kill(-1, 0) read kill(18446744073709551615), and a pid with junk
    above them a pid that is not the one the kernel used; red-team round 39)."""
    low = value & 0xFFFFFFFF
    return str(low - (1 << 32) if low & 0x80000000 else low)


def read_memory(pid: int, addr: int, size: int) -> bytes | None:
    """Up to ``size`` bytes at ``addr`` in the worker (for a report only)."""
    if addr == 0 or size <= 0:
        return None
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.pread(fd, size, addr)
    except OSError:
        return None
    finally:
        os.close(fd)


def sockaddr_text(raw: bytes) -> str | None:
    """A socket address as strace shows it: {AF_UNIX, "/run/x"},
    {AF_INET, 10.0.0.1:53}, {AF_INET6, [::1]:53}; None if unreadable."""
    if len(raw) < 2:
        return None
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == socket.AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":  # abstract: the name is the rest, NULs included
            return "{AF_UNIX, @" + repr(path[1:].decode("utf-8", "backslashreplace")) + "}"
        return "{AF_UNIX, " + repr(path.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")) + "}"
    if family == socket.AF_INET and len(raw) >= 8:
        return f"{{AF_INET, {socket.inet_ntop(socket.AF_INET, raw[4:8])}:{int.from_bytes(raw[2:4], 'big')}}}"
    if family == socket.AF_INET6 and len(raw) >= 24:
        return f"{{AF_INET6, [{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{int.from_bytes(raw[2:4], 'big')}}}"
    return f"{{family {family}}}"


def read_c_string(pid: int, addr: int, limit: int = _MAX_STR) -> str | None:
    raw = read_memory(pid, addr, limit + 1)
    if raw is None:
        return None
    text = raw.split(b"\0", 1)[0]
    out = text[:limit].decode("utf-8", "backslashreplace")
    return out + "..." if len(text) > limit else out


def describe(name: str, args: tuple[int, ...], pid: int) -> str:
    """``name(arg, ...)`` with paths decoded where the syscall takes them."""
    return report(name, args, pid)[0]


def report(name: str, args: tuple[int, ...], pid: int) -> tuple[str, str]:
    """``describe()``, and a likely cause to add to it ("" if none is known)."""
    strings = _STRING_ARGS.get(name, ())
    addr_at, len_at, arity = _SOCKADDR_ARGS.get(name, (-1, -1, _ARITY.get(name, len(args))))
    shown = []
    paths = []
    for i, value in enumerate(args[:arity]):
        if i == addr_at and len_at < len(args):
            raw = read_memory(pid, value, min(args[len_at] & 0xFFFFFFFF, _MAX_SOCKADDR))
            text = sockaddr_text(raw) if raw is not None else None
            shown.append(text if text is not None else hex(value))
        elif i in strings:
            text = read_c_string(pid, value)
            shown.append(repr(text) if text is not None else hex(value))
            if text is not None:
                paths.append(text)
        elif i == 0 and name in _DIRFD_ARG0 and (value & 0xFFFFFFFF) == (AT_FDCWD & 0xFFFFFFFF):
            shown.append("AT_FDCWD")
        else:
            shown.append(_named(name, i, value) or hex(value))
    while len(shown) > 1 and shown[-1] == "0x0" and len(shown) - 1 not in strings:
        shown.pop()
    hint = _IMPORT_HINT if any(_looks_imported(p) for p in paths) else ""
    if hint and any(p.endswith(".py") for p in paths):
        hint += _SOURCE_HINT
    elif not hint and name == "getcwd":
        hint = _CWD_HINT
    elif not hint and name in _OPENS and paths and (paths[0].startswith("/") or shown[0] == "AT_FDCWD"):
        hint = _PATH_HINT
    elif name in _CLOCK_CALLS and args and args[0] & 0x80000000:
        hint = _CLOCK_HINT
    elif name == "mmap" and len(args) > 4 and not args[3] & _MAP_ANONYMOUS and args[4] & 0xFFFFFFFF != 0xFFFFFFFF:
        hint = _MAP_HINT.format(fd=args[4] & 0xFFFFFFFF)
    return f"{name}({', '.join(shown)})", hint


_IMPORT_HINT = (
    ": a path Python's import system looks at. An import after sandbox entry? Import at module level or in "
    "setup(), which runs before it (to find which import: with Policy().with_sandbox(violation=\"errno\"), it "
    "fails in the worker with an exception, often naming the module, and the worker lives)"
)
# A source file is also what Python's own traceback printer reads (a hook of the program's that
# replaced privsep's and failed, an exception printed by C code): privsep's hooks never read it.
_SOURCE_HINT = "; or a traceback printed with its source lines by a hook of your own"
_MODULE_SUFFIXES = (".py", ".pyc", ".so", ".pth")
_OPENS = frozenset({"open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "statx", "access",
                    "faccessat", "faccessat2", "readlink", "readlinkat"})
_CWD_HINT = (
    ": a worker has no working directory. os.getcwd(), os.path.abspath() and tempfile ask for it: keep "
    "scratch data in memory (io.BytesIO), or ask the broker for a file (self.broker.create())"
)
_CLOCK_HINT = (
    ": a process's CPU clock named by its pid. A worker reads its own as pid 0 (CLOCK_PROCESS_CPUTIME_ID, "
    "time.process_time()) and its threads', never another process's, nor its own by its pid "
    "(glibc's clock_getcpuclockid(getpid()))"
)
_MAP_ANONYMOUS = 0x20
# (Pillow's PDF writer maps its output to read it back: a pipe output killed the worker, which read
# the report as a bug of its own; a user trial.)
_MAP_HINT = (
    ": a mapping of the file at fd {fd}. A worker maps a file only when it holds it from its spawn with "
    "MMAP_R (grants=); a file it got later (a call's argument, self.broker.open(), an output) cannot be "
    "mapped: read it, or give an output SEEK|FSTAT so that a library can read it back"
)
_PATH_HINT = (
    ": a worker opens nothing by path on its own. Take the file as a call's argument, or ask the broker "
    "(self.broker.open('relative/path')), or read it in setup(), which runs before sandbox entry"
)


def _looks_imported(path: str) -> bool:
    """A source or extension file, a __pycache__, a directory on sys.path
    (the broker's, as its zygote and workers get it: see ``_interp``), or a
    name with no suffix beneath one (a package's directory, as a lazy
    ``from .thread import ...`` in ``concurrent.futures`` stats it)."""
    if path.endswith(_MODULE_SUFFIXES) or "__pycache__" in path:
        return True
    path = os.path.normpath(path)
    entries = [e for e in import_entries() if e not in ("", "/")]
    if path in entries:
        return True
    return "." not in os.path.basename(path) and any(path.startswith(e + "/") for e in entries)
