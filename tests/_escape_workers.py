"""The escape suite's attacks and worker classes (test_escape.py), in a module of
their own: a zygote imports a worker's module, and each exec'd worker imports it
afresh; this one imports neither pytest nor the tests."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from worker import Worker, rpc
from worker._lifeline import PREFERRED_SLOT
from worker.sandbox._libc import ffi, lib

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000


def sc(nr: int, *args: Any) -> int:
    """Raw syscall: result, or -errno."""
    cargs = [ffi.cast("long", a) if isinstance(a, int) else a for a in args]
    rc = int(lib.syscall(ffi.cast("long", nr), *cargs))
    return -ffi.errno if rc == -1 else rc


def cstr(s: str) -> Any:
    return ffi.new("char[]", s.encode())


# ---- the attacks (run inside the worker; ``arg`` is whatever the case passes) ----

def _open_abs(w: Worker, arg: Any) -> Any:
    return os.open("/etc/passwd", os.O_RDONLY)


def _stat_abs(w: Worker, arg: Any) -> Any:
    return os.stat("/etc/shadow").st_size


def _unlink_abs(w: Worker, arg: Any) -> Any:
    os.unlink(arg)


def _mkdir_abs(w: Worker, arg: Any) -> Any:
    os.mkdir(arg)


def _rename_abs(w: Worker, arg: Any) -> Any:
    os.rename(arg, arg + ".moved")


def _symlink_abs(w: Worker, arg: Any) -> Any:
    os.symlink("/etc/passwd", arg)


def _chmod_abs(w: Worker, arg: Any) -> Any:
    os.chmod(arg, 0o777)


def _readlink_proc(w: Worker, arg: Any) -> Any:
    return os.readlink("/proc/self/exe")


def _openat_fdcwd_raw(w: Worker, arg: Any) -> Any:
    return sc(257, AT_FDCWD & 0xFFFFFFFF, cstr("/etc/passwd"), 0)  # AT_FDCWD without sign extension


def _openat2_abs(w: Worker, arg: Any) -> Any:
    how = ffi.new("uint64_t[3]")
    return sc(437, AT_FDCWD, cstr("/etc/passwd"), how, 24)


def _statx_abs(w: Worker, arg: Any) -> Any:
    return sc(332, AT_FDCWD, cstr("/etc/passwd"), 0, 0xFFF, ffi.new("char[256]"))


def _fstatat_abs_via_fd(w: Worker, arg: Any) -> Any:
    # AT_EMPTY_PATH on a held fd passes seccomp; the path is absolute
    return sc(262, 0, cstr("/etc/passwd"), ffi.new("char[256]"), AT_EMPTY_PATH)


def _openat_dotdot(w: Worker, d: Any) -> Any:
    return os.open("../secret", os.O_RDONLY, dir_fd=d.fileno())


def _stat_dotdot(w: Worker, d: Any) -> Any:
    return os.stat("../../../../../../../../etc/passwd", dir_fd=d.fileno()).st_size


def _openat_inside(w: Worker, d: Any) -> Any:
    return os.open("a.txt", os.O_RDONLY, dir_fd=d.fileno())


def _proc_reopen(w: Worker, f: Any) -> Any:
    return os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDWR)


def _write_ro(w: Worker, f: Any) -> Any:
    return os.write(f.fileno(), b"pwned")


def _ftruncate_ro(w: Worker, f: Any) -> Any:
    os.ftruncate(f.fileno(), 0)


def _socket_inet(w: Worker, arg: Any) -> Any:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM).fileno()


def _socket_netlink(w: Worker, arg: Any) -> Any:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).fileno()


def _socket_unix_dgram(w: Worker, arg: Any) -> Any:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).fileno()


def _connect_abstract(w: Worker, name: Any) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b"\0" + name.encode())
    return "connected"


def _execve(w: Worker, arg: Any) -> Any:
    os.execv("/bin/sh", ["sh", "-c", "id"])


def _execveat_memfd(w: Worker, arg: Any) -> Any:
    from protocol._wire import _region

    # memfd_create is denied (memfd_exec below): the one memfd a sandboxed worker holds, its BlobRegion
    fd = os.dup(_region.fds[0]) if _region is not None else os.memfd_create("x", os.MFD_CLOEXEC)
    os.pwrite(fd, b"#!/bin/sh\nid\n", 0)
    argv = ffi.new("char *[]", [cstr("x"), ffi.NULL])
    envp = ffi.new("char *[]", [ffi.NULL])
    return sc(322, fd, cstr(""), argv, envp, AT_EMPTY_PATH)


def _fork(w: Worker, arg: Any) -> Any:
    pids = []
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    return len(pids)


def _vfork_raw(w: Worker, arg: Any) -> Any:
    return sc(58)


def _thread_bomb(w: Worker, arg: Any) -> Any:
    # Raw threads: threading.Thread.start() waits for its thread to say it
    # started, and one that dies of MemoryError first (its stack fitted under
    # RLIMIT_AS, its bootstrap did not) never says so: CPython 3.11 waits for
    # ever, whether sandboxed or not, at a few pages of address space.
    import _thread

    gate = _thread.allocate_lock()
    gate.acquire()
    count = _thread.allocate_lock()
    running = [0]

    def hold() -> None:
        with count:
            running[0] += 1
        gate.acquire()
        gate.release()
        with count:
            running[0] -= 1

    started = 0
    try:
        while started < 100_000:
            _thread.start_new_thread(hold, ())
            started += 1
    except (RuntimeError, MemoryError):
        pass
    finally:
        gate.release()
    deadline = time.monotonic() + 10
    while running[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"started": started, "running": running[0]}


def _huge_alloc(w: Worker, arg: Any) -> Any:
    return len(bytearray(64 << 30))


def _ptrace_broker(w: Worker, arg: Any) -> Any:
    return sc(101, 16, os.getppid(), 0, 0)  # PTRACE_ATTACH


def _process_vm_writev(w: Worker, arg: Any) -> Any:
    buf = ffi.new("char[8]")
    iov = ffi.new("uint64_t[2]", [int(ffi.cast("uint64_t", buf)), 8])
    return sc(311, os.getppid(), iov, 1, iov, 1, 0)


def _process_vm_readv(w: Worker, arg: Any) -> Any:
    buf = ffi.new("char[8]")
    iov = ffi.new("uint64_t[2]", [int(ffi.cast("uint64_t", buf)), 8])
    return sc(310, os.getppid(), iov, 1, iov, 1, 0)


def _kill_broker(w: Worker, arg: Any) -> Any:
    os.kill(os.getppid(), 0)  # same permission check as SIGKILL, without the risk to the test run


def _kill_all(w: Worker, arg: Any) -> Any:
    return sc(62, -1, 0)


def _tgkill_broker(w: Worker, arg: Any) -> Any:
    return sc(234, os.getppid(), os.getppid(), signal.SIGTERM)


def _cpu_clock(pid: int, thread: bool = False) -> int:
    """A CPU clock id as the kernel encodes it: (~pid << 3) | which (2, SCHED), bit 2 for a thread."""
    return (~pid << 3) | (4 if thread else 0) | 2


def _cpu_clock_of_init(w: Worker, arg: Any) -> Any:
    return sc(228, _cpu_clock(1), ffi.new("long[2]"))  # clock_gettime: init's CPU time, to the ns


def _timer_on_init_clock(w: Worker, arg: Any) -> Any:
    return sc(222, _cpu_clock(1), ffi.NULL, ffi.new("int *"))  # timer_create


def _own_cpu_clocks(w: Worker, arg: Any) -> Any:
    """What a worker may read: static ids (process_time, thread_time), its own process's and thread's
    CPU clocks, as the pid field 0 or its threads' tids name them."""
    ts = ffi.new("long[2]")
    ids = [2, 3, _cpu_clock(0), _cpu_clock(0, thread=True), _cpu_clock(threading.get_native_id(), thread=True)]
    return [sc(228, c, ts) for c in ids] + [sc(229, c, ts) for c in ids] + [time.process_time() >= 0]


def _futex_lock_pi(w: Worker, arg: Any) -> Any:
    word = ffi.new("uint32_t *", 1)  # "owned by tid 1": the answer said whether that task exists
    return sc(202, word, 6 | 128, 0, ffi.new("long[2]", [0, 1000]))  # FUTEX_LOCK_PI | FUTEX_PRIVATE_FLAG


def _pidfd_open(w: Worker, arg: Any) -> Any:
    return sc(434, os.getppid(), 0)


def _io_uring(w: Worker, arg: Any) -> Any:
    return sc(425, 8, ffi.new("char[120]"))


def _bpf(w: Worker, arg: Any) -> Any:
    return sc(321, 0, ffi.new("char[128]"), 128)


def _userfaultfd(w: Worker, arg: Any) -> Any:
    return sc(323, 0)


def _perf_event_open(w: Worker, arg: Any) -> Any:
    return sc(298, ffi.new("char[128]"), 0, -1, -1, 0)


def _keyctl(w: Worker, arg: Any) -> Any:
    return sc(250, 0, -3, 0)  # KEYCTL_GET_KEYRING_ID, session keyring


def _add_key(w: Worker, arg: Any) -> Any:
    return sc(248, cstr("user"), cstr("x"), cstr("y"), 1, -3)


def _personality(w: Worker, arg: Any) -> Any:
    return sc(135, 0x0400000)  # READ_IMPLIES_EXEC


def _clone_newuser(w: Worker, arg: Any) -> Any:
    return sc(56, 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)


def _clone_thread_newns(w: Worker, arg: Any) -> Any:
    return sc(56, 0x10F00 | 0x20000, 0, 0, 0, 0)


def _unshare(w: Worker, arg: Any) -> Any:
    return sc(272, 0x10000000)


def _setns(w: Worker, arg: Any) -> Any:
    return sc(308, 0, 0)


def _mount(w: Worker, arg: Any) -> Any:
    return sc(165, cstr("none"), cstr("/tmp"), cstr("tmpfs"), 0, 0)


def _chroot(w: Worker, arg: Any) -> Any:
    return sc(161, cstr("/"))


def _tiocsti(w: Worker, arg: Any) -> Any:
    return sc(16, 0, 0x5412, cstr("x"))


def _tiocsti_high(w: Worker, arg: Any) -> Any:
    return sc(16, 0, (0xDEAD << 32) | 0x5412, cstr("x"))


def _x32(w: Worker, arg: Any) -> Any:
    return sc(0x40000000 | 39)


def _second_listener(w: Worker, arg: Any) -> Any:
    insn = ffi.new("uint64_t[1]", [0x7FFF0000 << 32 | 0x06])  # RET ALLOW
    prog = ffi.new("uint64_t[2]", [1, int(ffi.cast("uint64_t", insn))])
    return sc(317, 1, 8, prog)  # SET_MODE_FILTER, NEW_LISTENER


def _mmap_exec(w: Worker, arg: Any) -> Any:
    return mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).size()


def _mprotect_exec(w: Worker, arg: Any) -> Any:
    m = mmap.mmap(-1, 4096)
    w._keep = m  # type: ignore[attr-defined]
    return sc(10, int(ffi.cast("long", ffi.from_buffer(m))), 4096, 7)


def _memfd_exec(w: Worker, arg: Any) -> Any:
    return sc(319, cstr("x"), 0x10)


def _pidfd_getfd(w: Worker, arg: Any) -> Any:
    return sc(438, 0, 0, 0)


def _open_by_handle(w: Worker, arg: Any) -> Any:
    return sc(304, 0, ffi.new("char[64]"), 0)


def _kcmp(w: Worker, arg: Any) -> Any:
    return sc(312, os.getpid(), os.getppid(), 0, 0, 0)


def _modify_ldt(w: Worker, arg: Any) -> Any:
    return sc(154, 1, ffi.new("char[16]"), 16)


def _finit_module(w: Worker, arg: Any) -> Any:
    return sc(313, 0, cstr(""), 0)


def _kexec(w: Worker, arg: Any) -> Any:
    return sc(246, 0, 0, 0, 0)


def _dumpable(w: Worker, arg: Any) -> Any:
    return lib.prctl(4, 1, 0, 0, 0)


def _clear_pdeathsig(w: Worker, arg: Any) -> Any:
    return lib.prctl(1, 0, 0, 0, 0)


def _setuid(w: Worker, arg: Any) -> Any:
    return sc(105, 0)


def _fcntl_setown(w: Worker, arg: Any) -> Any:
    return sc(72, 0, 8, os.getppid())  # F_SETOWN: SIGIO to the broker


def _lifeline_setsig(w: Worker, arg: Any) -> Any:
    # F_SETSIG on its lifeline (worker._lifeline): SIGIO, not SIGKILL, once the broker dies
    return sc(72, PREFERRED_SLOT, 10, 0)


def _lifeline_reopen(w: Worker, arg: Any) -> Any:
    # A write end of the pipe its lifeline is on (worker._lifeline): one write would kill every worker armed on it
    return os.open(f"/proc/self/fd/{PREFERRED_SLOT}", os.O_WRONLY | os.O_NONBLOCK)


def _madvise_hwpoison(w: Worker, arg: Any) -> Any:
    m = mmap.mmap(-1, 4096)
    w._keep = m  # type: ignore[attr-defined]
    return sc(28, int(ffi.cast("long", ffi.from_buffer(m))), 4096, 100)


def _future_syscall(w: Worker, arg: Any) -> Any:
    return sc(470)


def _clone3(w: Worker, arg: Any) -> Any:
    return sc(435, ffi.new("uint64_t[11]"), 88)


ATTACKS: dict[str, Callable[[Worker, Any], Any]] = {
    name[1:]: fn for name, fn in list(globals().items()) if name.startswith("_") and callable(fn)
    and getattr(fn, "__module__", "") == __name__ and fn.__code__.co_varnames[:2] == ("w", "arg")
}
ATTACKS.update({"openat_dotdot": _openat_dotdot, "stat_dotdot": _stat_dotdot, "openat_inside": _openat_inside,
                "proc_reopen": _proc_reopen, "write_ro": _write_ro, "ftruncate_ro": _ftruncate_ro,
                "connect_abstract": _connect_abstract})


class Attacker(Worker):
    @rpc
    def attack(self, name: str, arg: Any = None) -> dict[str, Any]:
        if arg == "@grant":
            arg = self.grants["d"]  # a directory held since spawn: a real fd and a Landlock rule
        try:
            return {"ok": repr(ATTACKS[name](self, arg))}
        except OSError as exc:
            return {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
        except Exception as exc:
            return {"exc": type(exc).__name__}

    @rpc
    def ping(self) -> str:
        return "pong"


class SetupAttacker(Attacker):
    """The same attacker with a setup() of its own, so the zygote never makes it
    ahead: its spare gets the request first, then sets up and enters."""

    def setup(self) -> None:
        self.set_up = True


class Int80Attacker(Attacker):
    def setup(self) -> None:
        # mapped executable before entry (exec mappings are denied after it)
        self.page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.page.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax,20; int 0x80; ret

    @rpc
    def int80(self) -> int:
        return int(ffi.cast("long(*)(void)", ffi.from_buffer(self.page))())
