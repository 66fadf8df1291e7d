"""Escape suite: one fresh sandboxed worker per case, spawned the documented
way (``broker.spawn``), each case naming the layer that must stop it. After
every case the broker must still answer and hold exactly the fds it held
before. Then the ablation run: the filesystem cases again with seccomp off
(Landlock alone) and with Landlock off (seccomp alone), where both hold.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import READ, assert_no_fd_left, open_fds, spare_made_ahead

from broker import Broker, Policy
from protocol import PolicyViolation, Rights, WorkerCrashed
from worker import Worker, rpc
from worker.sandbox import probe
from worker.sandbox._libc import ffi, lib

PROBE = probe()
pytestmark = pytest.mark.skipif(not (PROBE["seccomp"] and PROBE["user_notif"]),
                                reason="needs seccomp user notification")
needs_landlock = pytest.mark.skipif(PROBE["landlock_abi"] < 6, reason="ablation needs Landlock ABI >= 6")

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


# ---- expected outcomes ----

@dataclass(frozen=True)
class Case:
    attack: str
    layer: str  # the layer that must stop it
    expect: tuple[str, Any]  # ("violation", syscall names) | ("errno", names) | ("exc", names) | ("check", fn)
    arg: str | None = None  # "ro_file", "dir", "abstract", "victim" or None


def V(*names: str) -> tuple[str, Any]:
    return ("violation", set(names))


def E(*names: str) -> tuple[str, Any]:
    return ("errno", set(names))


CASES = [
    Case("open_abs", "seccomp (openat AT_FDCWD)", V("openat")),
    Case("stat_abs", "seccomp (newfstatat AT_FDCWD)", V("newfstatat")),
    Case("unlink_abs", "seccomp (unlink by path)", V("unlink", "unlinkat"), "victim"),
    Case("mkdir_abs", "seccomp (mkdir by path)", V("mkdir", "mkdirat"), "fresh"),
    Case("rename_abs", "seccomp (rename by path)", V("rename", "renameat", "renameat2"), "victim"),
    Case("symlink_abs", "seccomp (symlink by path)", V("symlink", "symlinkat"), "fresh"),
    Case("chmod_abs", "seccomp (chmod by path)", V("chmod", "fchmodat"), "victim"),
    Case("readlink_proc", "seccomp (readlink)", V("readlink", "readlinkat")),
    Case("openat_fdcwd_raw", "seccomp (dirfd compared as int)", V("openat")),
    Case("openat2_abs", "seccomp (openat2 not allowed)", V("openat2")),
    Case("statx_abs", "seccomp (statx AT_FDCWD)", V("statx")),
    Case("fstatat_abs_via_fd", "namespaces (empty root; stat is not a Landlock right)",
         ("check", lambda r: r == {"ok": str(-errno.ENOENT)})),
    # (the grant is bind-mounted into the empty root: '..' ends there; Landlock alone: the ablation)
    Case("openat_dotdot", "namespaces (grant moved into the empty root) + Landlock", E("ENOENT"), "dir"),
    Case("stat_dotdot", "namespaces (grant moved into the empty root; stat is no Landlock right)",
         E("ENOENT"), "dir"),
    Case("openat_inside", "allowed: beneath the directory rule", ("check", lambda r: "ok" in r), "dir"),
    Case("proc_reopen", "seccomp (openat AT_FDCWD) + empty root", V("openat"), "ro_file"),
    Case("write_ro", "access mode at open", E("EBADF"), "ro_file"),
    Case("ftruncate_ro", "access mode at open", E("EINVAL", "EBADF"), "ro_file"),
    Case("socket_inet", "seccomp (socket family)", V("socket")),
    Case("socket_netlink", "seccomp (socket family)", V("socket")),
    Case("socket_unix_dgram", "seccomp (socket type)", V("socket")),
    Case("connect_abstract", "seccomp (connect) + Landlock scope", V("connect"), "abstract"),
    Case("execve", "seccomp (exec)", V("execve")),
    Case("execveat_memfd", "seccomp (exec)", V("execveat")),
    Case("fork", "seccomp (clone without CLONE_THREAD)", V("clone")),
    Case("vfork_raw", "seccomp", V("vfork")),
    Case("thread_bomb", "rlimits (RLIMIT_AS bounds thread stacks)", ("check", lambda r: "ok" in r)),
    Case("huge_alloc", "rlimits (RLIMIT_AS)", ("exc", {"MemoryError"})),
    Case("ptrace_broker", "seccomp", V("ptrace")),
    Case("process_vm_writev", "seccomp", V("process_vm_writev")),
    Case("process_vm_readv", "seccomp", V("process_vm_readv")),
    Case("kill_broker", "seccomp (kill pinned to own pid) + Landlock signal scope", V("kill")),
    Case("kill_all", "seccomp (kill pinned to own pid)", V("kill")),
    Case("tgkill_broker", "seccomp (tgkill pinned to own pid)", V("tgkill")),
    Case("pidfd_open", "seccomp", V("pidfd_open")),
    Case("cpu_clock_of_init", "seccomp (clock ids: own clocks only)", V("clock_gettime")),
    Case("timer_on_init_clock", "seccomp (clock ids: own clocks only)", V("timer_create")),
    Case("own_cpu_clocks", "allowed: its own clocks", ("check", lambda r: r == {"ok": repr([0] * 10 + [True])})),
    Case("futex_lock_pi", "seccomp (futex: no PI operations)", V("futex")),
    Case("io_uring", "seccomp", V("io_uring_setup")),
    Case("bpf", "seccomp", V("bpf")),
    Case("userfaultfd", "seccomp", V("userfaultfd")),
    Case("perf_event_open", "seccomp", V("perf_event_open")),
    Case("keyctl", "seccomp", V("keyctl")),
    Case("add_key", "seccomp", V("add_key")),
    Case("personality", "seccomp", V("personality")),
    Case("clone_newuser", "seccomp (clone flags)", V("clone")),
    Case("clone_thread_newns", "seccomp (clone flags)", V("clone")),
    Case("unshare", "seccomp", V("unshare")),
    Case("setns", "seccomp", V("setns")),
    Case("mount", "seccomp", V("mount")),
    Case("chroot", "seccomp", V("chroot")),
    Case("tiocsti", "seccomp (ioctl allowlist)", V("ioctl")),
    Case("tiocsti_high", "seccomp (ioctl low 32 bits)", V("ioctl")),
    Case("x32", "seccomp (x32 bit)", V("x32:getpid")),
    Case("second_listener", "seccomp (seccomp itself denied)", V("seccomp")),
    Case("mmap_exec", "seccomp (PROT_EXEC)", V("mmap")),
    Case("mprotect_exec", "seccomp (PROT_EXEC)", V("mprotect")),
    Case("memfd_exec", "seccomp (MFD_EXEC)", V("memfd_create")),
    Case("pidfd_getfd", "seccomp", V("pidfd_getfd")),
    Case("open_by_handle", "seccomp", V("open_by_handle_at")),
    Case("kcmp", "seccomp", V("kcmp")),
    Case("modify_ldt", "seccomp", V("modify_ldt")),
    Case("finit_module", "seccomp", V("finit_module")),
    Case("kexec", "seccomp", V("kexec_load")),
    Case("dumpable", "seccomp (prctl allowlist)", V("prctl")),
    Case("clear_pdeathsig", "seccomp (prctl allowlist)", V("prctl")),
    Case("setuid", "seccomp", V("setuid")),
    Case("fcntl_setown", "seccomp (fcntl allowlist)", V("fcntl")),
    Case("madvise_hwpoison", "seccomp (madvise advice)", V("madvise")),
    Case("future_syscall", "seccomp (unknown -> default action)", V("syscall_470")),
    Case("clone3", "seccomp (ENOSYS)", ("check", lambda r: r == {"ok": str(-errno.ENOSYS)})),
]


@pytest.fixture(scope="module")
def tree_m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("escape")
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("hello")
    (root / "out").mkdir()
    (root / "secret").write_text("top secret")
    return root


def make_broker(root: Path, spawn: str = "auto", **sandbox: Any) -> Broker:
    policy = Policy().allow("data/", READ | Rights.LOOKUP).allow("out/", Rights.WRITE | Rights.CREATE)
    # READ here includes SEEK|FSTAT, as a spawn-time directory grant must
    if sandbox:
        policy = policy.with_sandbox(**sandbox)
    return Broker(policy, root=root, call_timeout=30, spawn=spawn)


# The whole suite runs against workers from the zygote (its pre-forked spare,
# handed the request before setup and entry, and a spare that made the worker
# and entered its sandbox ahead of the request), a plain fork and an exec'd
# fresh interpreter: all must give the same sandbox.
@pytest.fixture(scope="module", params=["zygote", "zygote-ahead", "fork", "exec"])
def broker_m(request: pytest.FixtureRequest, tree_m: Path) -> Iterator[tuple[Broker, Any]]:
    method = request.param.split("-")[0]
    with make_broker(tree_m, spawn=method) as b:
        witness = b.spawn(Attacker)
        assert witness.spawn_method == method
        if method == "zygote":
            b.ahead = request.param == "zygote-ahead"  # type: ignore[attr-defined]
        yield b, witness


@pytest.fixture(scope="module")
def abstract_server() -> Iterator[str]:
    name = f"privsep-escape-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(b"\0" + name.encode())
    srv.listen(8)
    yield name
    srv.close()


def _arg(kind: str | None, b: Broker, root: Path, abstract: str) -> Any:
    if kind == "ro_file":
        return b.open("data/a.txt", READ)
    if kind == "dir":
        return b.opendir("data/", Rights.LOOKUP | READ | Rights.SEEK | Rights.FSTAT)
    if kind == "abstract":
        return abstract
    if kind == "victim":
        return str(root / "secret")
    if kind == "fresh":
        return str(root / "fresh")
    return None


def run_case(b: Broker, witness: Any, root: Path, case: Case, abstract: str) -> dict[str, Any]:
    """Run one case in a fresh worker; check the outcome, the broker and fds."""
    ahead = getattr(b, "ahead", None)  # zygote only: whether the worker must be made ahead
    if ahead and case.arg != "dir" and not spare_made_ahead(b):
        b.spawn(Attacker).kill()  # a spawn with grants came before: this makes the next spare ahead
        assert spare_made_ahead(b)
    before = open_fds(b)
    arg = _arg(case.arg, b, root, abstract)
    grants = {"d": arg} if case.arg == "dir" else None
    w = b.spawn(SetupAttacker if ahead is False else Attacker, grants=grants)
    if ahead is not None:  # the zygote: the path this parameter is about was taken
        assert w.sandbox.get("ahead", False) is (ahead and grants is None), w.sandbox
    sent = "@grant" if grants else arg
    kind, want = case.expect
    try:
        if kind == "violation":
            with pytest.raises(PolicyViolation) as info:
                w.attack(case.attack, sent)
            assert info.value.syscall in want, f"{case.attack}: stopped for {info.value.syscall}, want {want}"
            got: dict[str, Any] = {"violation": info.value.syscall}
        else:
            got = w.attack(case.attack, sent)
            if kind == "check":
                assert want(got), f"{case.attack}: {got}"
            else:
                assert kind in got and got[kind] in want, f"{case.attack} ({case.layer}): {got}"
            assert w.ping() == "pong"  # the worker survived its own attempt
    finally:
        if hasattr(arg, "close"):
            arg.close()
        w.kill()
    # the broker still answers: a request of its own and a call to another worker
    with b.open("data/a.txt", READ) as f:
        assert f.read_all() == b"hello"
    assert witness.ping() == "pong"
    assert (root / "secret").read_text() == "top secret"
    assert not (root / "fresh").exists() and not (root / "secret.moved").exists()
    assert_no_fd_left(b, before, case.attack)
    return got


@pytest.mark.parametrize("case", CASES, ids=[c.attack for c in CASES])
def test_escape(case: Case, broker_m: tuple[Broker, Any], tree_m: Path, abstract_server: str) -> None:
    b, witness = broker_m
    run_case(b, witness, tree_m, case, abstract_server)


def test_int80_i386_entry(broker_m: tuple[Broker, Any], tree_m: Path) -> None:
    """Layer: seccomp arch check (AUDIT_ARCH_I386 -> KILL_PROCESS, SIGSYS)."""
    b, witness = broker_m
    before = open_fds(b)
    w = b.spawn(Int80Attacker)
    with pytest.raises(WorkerCrashed) as info:
        w.int80()
    assert info.value.exit.signal == signal.SIGSYS
    w.kill()
    assert witness.ping() == "pong"
    assert open_fds(b) == before


def test_suite_is_big_enough() -> None:
    assert len(CASES) + 1 >= 40


# ---- ablation: each filesystem case with one layer switched off ----
# (attack, arg, outcome with Landlock alone, outcome with seccomp alone).
# Landlock alone runs without namespaces too, so the empty root does not help.
ABLATION = [
    ("open_abs", None, E("EACCES"), V("openat")),
    ("openat_fdcwd_raw", None, ("check", lambda r: r == {"ok": str(-errno.EACCES)}), V("openat")),
    ("openat2_abs", None, ("check", lambda r: r == {"ok": str(-errno.EACCES)}), V("openat2")),
    ("unlink_abs", "victim", E("EACCES"), V("unlink", "unlinkat")),
    ("mkdir_abs", "fresh", E("EACCES"), V("mkdir", "mkdirat")),
    ("rename_abs", "victim", E("EACCES", "EXDEV"), V("rename", "renameat", "renameat2")),
    ("symlink_abs", "fresh", E("EACCES"), V("symlink", "symlinkat")),
    ("openat_dotdot", "dir", E("EACCES"), V("openat")),
    ("proc_reopen", "ro_file", E("EACCES"), V("openat")),
    ("write_ro", "ro_file", E("EBADF"), E("EBADF")),  # access mode holds with either
    ("execve", None, E("EACCES"), V("execve")),  # Landlock: EXECUTE handled, no rule
    ("connect_abstract", "abstract", E("EPERM"), V("connect")),
    ("kill_broker", None, E("EPERM"), V("kill")),
]


@pytest.fixture(scope="module", params=["landlock", "seccomp"])
def ablated_m(request: pytest.FixtureRequest, tree_m: Path) -> Iterator[tuple[str, Broker, Any]]:
    """One broker per layer left alone (each case still runs in a fresh
    worker, and run_case checks the broker, the tree and its fds after it)."""
    if request.param == "landlock":
        sandbox = {"seccomp": False, "namespaces": False}
    else:
        sandbox = {"landlock": False, "namespaces": False}
    with make_broker(tree_m, **sandbox) as b:
        yield request.param, b, b.spawn(Attacker)


@needs_landlock
@pytest.mark.parametrize("row", ABLATION, ids=[r[0] for r in ABLATION])
def test_ablation(row: tuple[Any, ...], ablated_m: tuple[str, Broker, Any], tree_m: Path,
                  abstract_server: str) -> None:
    attack, arg, landlock_only, seccomp_only = row
    alone, b, witness = ablated_m
    expect = landlock_only if alone == "landlock" else seccomp_only
    run_case(b, witness, tree_m, Case(attack, alone, expect, arg), abstract_server)
