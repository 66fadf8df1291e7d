"""Real-kernel tests of each sandbox layer. Every case forks a fresh child that
enters the sandbox and tries one thing; the parent plays the broker's
seccomp-notify supervisor and checks the exact outcome and which layer gave it.
Skips come only from ``probe()``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import resource
import select
import signal
import socket
import stat as stat_module
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from broker import _notify
from protocol import ProtocolError, Rights, SandboxError
from worker.sandbox import ALWAYS_DENIED, Limits, SandboxSpec, _entry, _seccomp, enter, prepare, probe
from worker.sandbox._libc import ffi, lib
from worker.sandbox._seccomp_rules import DANGEROUS, GROUPS
from worker.sandbox._syscalls import NAMES

PROBE = probe()
needs_notify = pytest.mark.skipif(not PROBE["user_notif"], reason="kernel lacks seccomp user notification")
needs_landlock = pytest.mark.skipif(PROBE["landlock_abi"] < 1, reason="kernel lacks Landlock")
needs_scopes = pytest.mark.skipif(PROBE["landlock_abi"] < 6, reason="Landlock ABI < 6: no scopes")
needs_net = pytest.mark.skipif(PROBE["landlock_abi"] < 4, reason="Landlock ABI < 4: no TCP rules")
needs_userns = pytest.mark.skipif("user" not in PROBE["namespaces"], reason="no user namespaces")

AT_FDCWD_32 = 0xFFFFFF9C
TIOCSTI = 0x5412
FIONREAD = 0x541B


def sys(nr: int, *args: int) -> int:
    """Raw syscall; returns the result or -errno."""
    cargs = [ffi.cast("long", a) if isinstance(a, int) else a for a in args]
    rc = int(lib.syscall(ffi.cast("long", nr), *cargs))
    return -ffi.errno if rc == -1 else rc


@dataclass
class Outcome:
    report: dict[str, Any] | None = None
    result: Any = None  # what the child sent after its attempt
    notes: list[_notify.Notification] = field(default_factory=list)
    status: int | None = None

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if self.status is not None and os.WIFSIGNALED(self.status) else None

    @property
    def first(self) -> _notify.Notification:
        assert self.notes, f"no notification; result={self.result!r} status={self.status}"
        return self.notes[0]


def _child(chan: socket.socket, prepared: Any, setup: Callable[[], dict[str, Any]] | None,
           attempt: Callable[[dict[str, Any]], Any]) -> None:
    try:
        ctx = setup() if setup else {}
        keep = [0, 1, 2, chan.fileno(), *ctx.get("keep", [])]
        try:
            rep = enter(prepared, keep)
        except SandboxError as exc:
            chan.send(json.dumps({"report": None, "entry_error": str(exc)}).encode())
            return
        lfd = rep.listener_fd
        payload = json.dumps({"report": dict(rep)}).encode()
        if lfd is not None:
            socket.send_fds(chan, [payload], [lfd])
            os.close(lfd)
        else:
            chan.send(payload)
        try:
            out: Any = {"ok": attempt(ctx)}
        except OSError as exc:
            out = {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
        except Exception as exc:
            out = {"exc": f"{type(exc).__name__}: {exc}"}
        chan.send(json.dumps(out).encode())
    finally:
        os._exit(0)


def run(attempt: Callable[[dict[str, Any]], Any], spec: SandboxSpec | None = None, *,
        setup: Callable[[], dict[str, Any]] | None = None, answer: str = "kill", prepared: Any = None,
        timeout: float = 5.0) -> Outcome:
    """Fork, enter the sandbox, run ``attempt(ctx)``; supervise from here.

    ``answer``: on a notification, "kill" the child (as the broker does by
    default) or answer "errno" (EPERM) and let it go on.
    """
    if prepared is None:
        prepared = prepare(spec or SandboxSpec())
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        parent.close()
        _child(child, prepared, setup, attempt)
    child.close()
    out = Outcome()
    lfd = -1
    deadline = time.monotonic() + timeout
    try:
        msg, fds, _, _ = socket.recv_fds(parent, 65536, 1)
        if fds:
            lfd = fds[0]
        first = json.loads(msg) if msg else {}
        out.report = first.get("report")
        if "entry_error" in first:
            out.result = {"entry_error": first["entry_error"]}
        poller = select.poll()
        poller.register(parent, select.POLLIN)
        if lfd >= 0:
            poller.register(lfd, select.POLLIN)
        done = out.result is not None or not msg
        while not done and time.monotonic() < deadline:
            for fd, ev in poller.poll(100):
                if fd == lfd and ev & select.POLLIN:
                    try:
                        note = _notify.receive(lfd)
                    except OSError:
                        continue
                    out.notes.append(note)
                    if answer == "kill":
                        os.kill(pid, signal.SIGKILL)
                        done = True
                    else:
                        _notify.respond_errno(lfd, note.id, errno.EPERM)
                elif fd == lfd and ev & (select.POLLHUP | select.POLLERR):
                    poller.unregister(lfd)
                elif fd == parent.fileno():
                    data = parent.recv(65536)
                    if data:
                        out.result = json.loads(data)
                    done = True
    finally:
        if out.result is None and not out.notes:
            os.kill(pid, signal.SIGKILL)
        _, out.status = os.waitpid(pid, 0)
        parent.close()
        if lfd >= 0:
            os.close(lfd)
    return out


def assert_notified(out: Outcome, name: str) -> _notify.Notification:
    note = out.first
    assert note.name == name, f"expected {name}, got {note.name}{note.args}"
    assert out.signal == signal.SIGKILL  # killed by the supervisor, not by SIGSYS
    return note


# ---------------------------------------------------------------- entry ----

def test_refuses_a_second_thread() -> None:
    def setup() -> dict[str, Any]:
        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
        return {}

    out = run(lambda ctx: "entered", setup=setup)
    assert out.report is None
    assert "single-threaded" in out.result["entry_error"]
    assert "Start threads in an @rpc call" in out.result["entry_error"]  # what to do instead


def test_report_lists_layers_in_order() -> None:
    out = run(lambda ctx: "ok")
    rep = out.report
    assert rep is not None and out.result == {"ok": "ok"}
    names = [layer.split(":")[0] for layer in rep["layers"]]
    expect = ["rlimits", "namespaces", "capabilities", "no_new_privs", "landlock", "seccomp"]
    if not PROBE["namespaces"]:
        expect.remove("namespaces")
    if not PROBE["landlock_abi"]:
        expect.remove("landlock")
    assert names == expect
    assert rep["landlock_abi"] == PROBE["landlock_abi"]
    assert rep["seccomp"] == ("notify" if PROBE["user_notif"] else "kill")
    assert out.status == 0


def test_rlimits_applied() -> None:
    limits = Limits(address_space=3 << 30, open_files=77, processes=9, file_size=1 << 20, cpu_seconds=30)

    def attempt(ctx: dict[str, Any]) -> Any:
        names = ["RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_CORE"]
        return {n: list(resource.getrlimit(getattr(resource, n))) for n in names}

    got = run(attempt, SandboxSpec(limits=limits)).result["ok"]
    assert got["RLIMIT_AS"] == [3 << 30, 3 << 30]
    assert got["RLIMIT_NOFILE"] == [77, 77]
    assert got["RLIMIT_NPROC"] == [9, 9]
    assert got["RLIMIT_FSIZE"] == [1 << 20, 1 << 20]
    assert got["RLIMIT_CPU"] == [30, 31]
    assert got["RLIMIT_CORE"] == [0, 0]


def test_rlimit_cannot_be_raised_again() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000))

    # EPERM, which CPython turns into ValueError; without a user namespace
    # only the dropped CAP_SYS_RESOURCE keeps a root worker from this
    for spec in (SandboxSpec(), SandboxSpec(namespaces=False)):
        assert run(attempt, spec).result == {"exc": "ValueError: not allowed to raise maximum limit"}


def test_fds_not_kept_are_closed() -> None:
    def setup() -> dict[str, Any]:
        return {"stray": os.open("/dev/null", os.O_RDONLY)}

    def attempt(ctx: dict[str, Any]) -> Any:
        os.fstat(ctx["stray"])

    assert run(attempt, setup=setup).result == {"errno": "EBADF"}


def test_no_new_privs_and_seccomp_mode() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        return [lib.prctl(39, 0, 0, 0, 0), lib.prctl(21, 0, 0, 0, 0)]  # GET_NO_NEW_PRIVS, GET_SECCOMP

    assert run(attempt).result == {"ok": [1, 2]}


def test_min_abi_fails_closed() -> None:
    spec = SandboxSpec(landlock_min_abi=PROBE["landlock_abi"] + 1)
    out = run(lambda ctx: "entered", spec)
    assert out.report is None
    assert "Landlock ABI" in out.result["entry_error"]


def test_spec_wire_round_trip_and_strictness() -> None:
    spec = SandboxSpec(violation="errno", syscall_groups=("@splice",), dangerous=("allow-fork",),
                       limits=Limits(cpu_seconds=5), fs_rules=((5, int(Rights.READ | Rights.LOOKUP)),))
    assert SandboxSpec.from_wire(spec.to_wire()) == spec
    bad = spec.to_wire()
    bad["fs_rules"] = [[5, "x"]]
    with pytest.raises(ProtocolError):
        SandboxSpec.from_wire(bad)
    bad = spec.to_wire()
    bad["extra"] = 1
    with pytest.raises(ProtocolError):
        SandboxSpec.from_wire(bad)
    bad = spec.to_wire()
    bad["syscall_groups"] = ["@everything"]
    with pytest.raises(SandboxError):
        SandboxSpec.from_wire(bad)
    with pytest.raises(SandboxError):
        SandboxSpec(dangerous=("allow-ptrace",))
    with pytest.raises(SandboxError):
        SandboxSpec(landlock=False, syscall_groups=("@fs-at",))


def test_groups_never_reach_the_always_denied_set() -> None:
    for name, rules in GROUPS.items():
        assert not ALWAYS_DENIED.intersection(rules), name
    for name, rules in DANGEROUS.items():
        assert not ALWAYS_DENIED.intersection(rules), name
    for spec_groups in [tuple(GROUPS)]:
        compiled = _seccomp.compile_filter(spec_groups, tuple(DANGEROUS))
        assert not ALWAYS_DENIED.intersection(compiled.allowed)


def test_syscall_table_matches_libseccomp() -> None:
    pyseccomp = pytest.importorskip("pyseccomp")
    for nr in range(0, 457):
        try:
            name = pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, nr)
        except ValueError:
            name = None
        name = name.decode() if isinstance(name, bytes) else name
        assert NAMES.get(nr) == name, nr
    assert NAMES[462] == "mseal" and NAMES[469] == "file_setattr"


# ------------------------------------------------------------- landlock ----

@pytest.fixture
def tree() -> Any:
    with tempfile.TemporaryDirectory() as top:
        os.mkdir(f"{top}/granted")
        with open(f"{top}/granted/f.txt", "w") as f:
            f.write("inside")
        with open(f"{top}/outside.txt", "w") as f:
            f.write("outside")
        yield top


def run_with_grant(path: str, rights: Rights, attempt: Callable[[dict[str, Any]], Any], **kw: Any) -> Outcome:
    """Grant directory ``path`` with ``rights`` (an fs rule for the fd the
    child inherits) and run ``attempt`` with ``ctx["dir"]`` = that fd."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        spec = SandboxSpec(fs_rules=((fd, int(rights)),), **kw)
        return run(attempt, spec, setup=lambda: {"dir": fd, "keep": [fd]})
    finally:
        os.close(fd)


def open_at(name: str, flags: int = os.O_RDONLY) -> Callable[[dict[str, Any]], Any]:
    def attempt(ctx: dict[str, Any]) -> Any:
        fd = os.open(name, flags | os.O_CLOEXEC, 0o600, dir_fd=ctx["dir"])
        try:
            return os.read(fd, 100).decode() if flags == os.O_RDONLY else "opened"
        finally:
            os.close(fd)

    return attempt


READ_DIR = Rights.READ | Rights.LOOKUP | Rights.FSTAT


@needs_landlock
def test_landlock_read_beneath_granted_dir(tree: str) -> None:
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at("f.txt"))
    assert out.result == {"ok": "inside"}
    assert "@fs-at" in out.report["groups"]
    assert out.report["fs_rules"][0][1] & (1 << 2)  # READ_FILE


@needs_landlock
def test_landlock_write_denied_on_read_grant(tree: str) -> None:
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at("f.txt", os.O_WRONLY))
    assert out.result == {"errno": "EACCES"}


@needs_landlock
def test_landlock_dotdot_escape_denied(tree: str) -> None:
    # Landlock alone (without namespaces the grant is where the host has it)
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at("../outside.txt"), namespaces=False)
    assert out.result == {"errno": "EACCES"}
    # control: the same walk works with Landlock off and the group forced on
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at("../outside.txt"), landlock=False, seccomp=False,
                         namespaces=False)
    assert out.result == {"ok": "outside"}


@needs_userns
def test_a_grant_held_from_spawn_is_moved_into_the_empty_root(tree: str) -> None:
    """``..`` from a directory granted at spawn walked up the host's tree
    (its fd was outside the empty root), so a worker could stat any host
    path, stat being no Landlock right (a claims audit). The grant is
    bind-mounted into the empty root: the walk ends there, the empty root
    alone stopping it."""
    def attempt(ctx: dict[str, Any]) -> Any:
        d = ctx["dir"]
        seen = {}
        for path in ("../outside.txt", "../../../../../etc/passwd", "f.txt"):
            try:
                seen[path] = stat_module.S_IFMT(os.stat(path, dir_fd=d).st_mode)
            except OSError as exc:
                seen[path] = errno.errorcode[exc.errno]
        return seen

    out = run_with_grant(f"{tree}/granted", READ_DIR, attempt, landlock=False, seccomp=False)
    assert "grantroot" in out.report["namespaces"], out.report
    assert out.result == {"ok": {"../outside.txt": "ENOENT", "../../../../../etc/passwd": "ENOENT",
                                 "f.txt": stat_module.S_IFREG}}
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at("../outside.txt"), landlock=False, seccomp=False)
    assert out.result == {"errno": "ENOENT"}
    assert run_with_grant(f"{tree}/granted", READ_DIR, open_at("f.txt")).result == {"ok": "inside"}


@needs_landlock
def test_landlock_absolute_path_via_dirfd_denied(tree: str) -> None:
    # openat ignores dirfd for absolute paths: seccomp cannot see the path, Landlock stops it
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at(f"{tree}/outside.txt"), namespaces=False)
    assert out.result == {"errno": "EACCES"}


@needs_userns
def test_empty_root_hides_absolute_paths(tree: str) -> None:
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at(f"{tree}/outside.txt"), landlock=False,
                         syscall_groups=())
    # without Landlock @fs-at is not implied: seccomp stops openat before the empty root matters
    assert_notified(out, "openat")
    out = run_with_grant(f"{tree}/granted", READ_DIR, open_at("/etc/passwd"))
    assert out.result == {"errno": "ENOENT"}  # the root is an empty tmpfs
    assert "emptyroot" in out.report["namespaces"]


@needs_landlock
def test_landlock_create_and_truncate_follow_rights(tree: str) -> None:
    rw = READ_DIR | Rights.WRITE | Rights.CREATE
    out = run_with_grant(f"{tree}/granted", rw, open_at("new.txt", os.O_WRONLY | os.O_CREAT))
    assert out.result == {"ok": "opened"}
    out = run_with_grant(f"{tree}/granted", rw, open_at("f.txt", os.O_WRONLY | os.O_TRUNC))
    assert out.result == {"errno": "EACCES"}  # no FTRUNCATE right
    out = run_with_grant(f"{tree}/granted", rw | Rights.FTRUNCATE, open_at("f.txt", os.O_WRONLY | os.O_TRUNC))
    assert out.result == {"ok": "opened"}


@needs_landlock
def test_landlock_unlink_needs_unlinkat(tree: str) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        os.unlink("f.txt", dir_fd=ctx["dir"])
        return "gone"

    assert run_with_grant(f"{tree}/granted", READ_DIR, attempt).result == {"errno": "EACCES"}
    assert run_with_grant(f"{tree}/granted", READ_DIR | Rights.UNLINKAT, attempt).result == {"ok": "gone"}


@needs_scopes
def test_landlock_scopes_abstract_unix_connect() -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(b"\0privsep-test-%d" % os.getpid())
    srv.listen(1)

    def attempt(ctx: dict[str, Any]) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(b"\0privsep-test-%d" % os.getppid())
        return "connected"

    try:
        # Landlock alone (seccomp off): the scope refuses with EPERM
        out = run(attempt, SandboxSpec(seccomp=False, namespaces=False))
        assert out.result == {"errno": "EPERM"}
        # seccomp alone: connect is not on the allowlist
        assert_notified(run(attempt, SandboxSpec(landlock=False, namespaces=False)), "connect")
        # control: with both off the same connect succeeds
        assert run(attempt, SandboxSpec(seccomp=False, landlock=False, namespaces=False)).result == {"ok": "connected"}
    finally:
        srv.close()


@needs_scopes
def test_landlock_scopes_signals() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        os.kill(os.getpid(), 0)
        os.kill(os.getppid(), 0)

    out = run(attempt, SandboxSpec(seccomp=False, namespaces=False))
    assert out.result == {"errno": "EPERM"}
    assert_notified(run(attempt, SandboxSpec(landlock=False)), "kill")


@needs_net
def test_landlock_denies_tcp_connect() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def attempt(ctx: dict[str, Any]) -> Any:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", port))
        return "connected"

    try:
        out = run(attempt, SandboxSpec(seccomp=False, namespaces=False))
        assert out.result == {"errno": "EACCES"}
        assert run(attempt, SandboxSpec(seccomp=False, landlock=False, namespaces=False)).result == {"ok": "connected"}
    finally:
        srv.close()


# -------------------------------------------------------------- seccomp ----

@needs_notify
def test_execve_is_reported_by_name() -> None:
    out = run(lambda ctx: os.execv("/bin/true", ["true"]))
    assert_notified(out, "execve")


@needs_notify
def test_socket_inet_denied_unix_allowed() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.close(), b.close()
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    note = assert_notified(run(attempt), "socket")
    assert note.args[0] == socket.AF_INET


@needs_notify
def test_unix_datagram_socket_denied() -> None:
    note = assert_notified(run(lambda ctx: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)), "socket")
    assert note.args[1] & 0xF == socket.SOCK_DGRAM


@needs_notify
def test_at_fdcwd_denied_even_with_fs_at() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        return os.open("/etc/passwd", os.O_RDONLY)

    note = assert_notified(run(attempt, SandboxSpec(syscall_groups=("@fs-at",))), "openat")
    assert note.args[0] & 0xFFFFFFFF == AT_FDCWD_32


_NR = {name: nr for nr, name in NAMES.items()}
_PATH = ffi.new("char[]", b"x")


@needs_notify
@pytest.mark.parametrize(("name", "args", "dirfd_at"), [
    ("renameat", (3, _PATH, -100, _PATH), 2),
    ("renameat2", (3, _PATH, -100, _PATH, 0), 2),
    ("linkat", (3, _PATH, -100, _PATH, 0), 2),
    # (target, newdirfd, linkpath): the rule read the target's pointer as the dirfd, so a target below
    # 2 GiB passed (here an address nothing is mapped at: EFAULT, had seccomp let it through)
    ("symlinkat", (0x10000000, -100, _PATH), 1),
])
def test_at_fdcwd_denied_as_every_dirfd_with_fs_at(name: str, args: tuple[Any, ...], dirfd_at: int) -> None:
    """With a directory granted at spawn (@fs-at), a rename's or link's
    second dirfd went unchecked, and symlinkat's dirfd was read from the
    wrong argument: AT_FDCWD got past seccomp (a claims audit; Landlock
    still refused)."""
    note = assert_notified(run(lambda ctx: sys(_NR[name], *args), SandboxSpec(syscall_groups=("@fs-at",))), name)
    assert note.args[dirfd_at] & 0xFFFFFFFF == AT_FDCWD_32


@needs_notify
def test_a_rename_that_leaves_a_whiteout_is_denied_with_fs_at() -> None:
    """RENAME_WHITEOUT leaves a character device (0:0) in the source's
    place, which Landlock does not check against MAKE_CHAR: a worker whose
    grant refused mknodat(S_IFCHR) made one (red-team round 43)."""
    note = assert_notified(run(lambda ctx: sys(_NR["renameat2"], 3, _PATH, 3, _PATH, 4),
                               SandboxSpec(syscall_groups=("@fs-at",))), "renameat2")
    assert note.args[4] == 4  # RENAME_WHITEOUT


@needs_landlock
def test_rename_and_link_within_a_granted_directory(tree: str) -> None:
    """Both dirfds a held directory: allowed, as its rights say (and
    renameat2's other flags)."""
    names = [ffi.new("char[]", name) for name in (b"h.txt", b"i.txt")]

    def attempt(ctx: dict[str, Any]) -> Any:
        d = ctx["dir"]
        os.rename("f.txt", "g.txt", src_dir_fd=d, dst_dir_fd=d)
        os.link("g.txt", "h.txt", src_dir_fd=d, dst_dir_fd=d)
        return sys(_NR["renameat2"], d, names[0], d, names[1], 1)  # RENAME_NOREPLACE

    rights = READ_DIR | Rights.CREATE | Rights.UNLINKAT | Rights.RENAMEAT
    assert run_with_grant(f"{tree}/granted", rights, attempt).result == {"ok": 0}
    assert sorted(os.listdir(f"{tree}/granted")) == ["g.txt", "i.txt"]


@needs_notify
def test_at_fdcwd_with_junk_high_bits_denied() -> None:
    # the kernel reads dirfd as an int: 0x1234_5678_ffff_ff9c is AT_FDCWD too
    path = ffi.new("char[]", b"/etc/passwd")

    def attempt(ctx: dict[str, Any]) -> Any:
        return sys(257, 0x12345678_FFFFFF9C, path, 0)

    note = assert_notified(run(attempt, SandboxSpec(syscall_groups=("@fs-at",))), "openat")
    assert note.args[0] == 0x12345678_FFFFFF9C


@needs_notify
def test_stat_by_path_denied_fstat_allowed() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        os.fstat(0)
        os.stat("/etc/passwd")

    note = assert_notified(run(attempt), "newfstatat")
    assert note.args[0] & 0xFFFFFFFF == AT_FDCWD_32


@needs_notify
def test_tiocsti_with_high_bits_denied() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        r, _w = os.pipe()
        n = ffi.new("int *")
        assert sys(16, r, (1 << 32) | FIONREAD, n) == 0  # allowed command, junk high bits: same command
        return sys(16, 0, (1 << 32) | TIOCSTI, ffi.new("char *", b"x"))

    note = assert_notified(run(attempt), "ioctl")
    assert note.args[1] == (1 << 32) | TIOCSTI


@needs_notify
def test_fcntl_allowlist() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        import fcntl

        r, w = os.pipe()
        fcntl.fcntl(r, fcntl.F_GETFD)
        fcntl.fcntl(w, fcntl.F_SETFL, os.O_APPEND)  # adding O_APPEND is fine
        fcntl.fcntl(w, fcntl.F_SETFL, 0)  # clearing it is not

    note = assert_notified(run(attempt), "fcntl")
    assert note.args[1] == 4


def test_clone3_gives_enosys() -> None:
    args = ffi.new("uint64_t[11]")

    def attempt(ctx: dict[str, Any]) -> Any:
        return sys(435, args, 88)

    out = run(attempt)
    assert out.result == {"ok": -errno.ENOSYS}
    assert not out.notes


@needs_notify
def test_x32_syscall_denied() -> None:
    out = run(lambda ctx: sys(0x40000000 | 39))
    assert_notified(out, "x32:getpid")


def test_int80_i386_entry_kills() -> None:
    # mov eax, 20 (i386 getpid); int 0x80; ret  -- mapped executable before entry
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])

    def setup() -> dict[str, Any]:
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m.write(code)
        return {"fn": ffi.cast("long(*)(void)", ffi.from_buffer(m)), "m": m}

    out = run(lambda ctx: int(ctx["fn"]()), setup=setup)
    assert out.signal == signal.SIGSYS  # ACT_BADARCH = KILL_PROCESS, no notification
    assert not out.notes


@needs_notify
def test_errno_mode_returns_eperm() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        try:
            os.execv("/bin/true", ["true"])
        except PermissionError as exc:
            return ["EPERM", exc.errno]

    out = run(attempt, SandboxSpec(violation="errno"), answer="errno")
    assert out.result == {"ok": ["EPERM", errno.EPERM]}
    assert out.first.name == "execve"
    assert out.status == 0


def test_fallback_without_notify() -> None:
    """No listener possible: 'errno' -> ERRNO(EPERM) from the filter, 'kill' -> SIGSYS."""
    for violation, expect in (("errno", {"ok": -errno.EPERM}), ("kill", None)):
        p = prepare(SandboxSpec(violation=violation))
        p = replace(p, notify=False)
        out = run(lambda ctx: sys(101, 0, 0, 0, 0), prepared=p)  # ptrace(TRACEME)
        assert out.report is not None and out.report["seccomp"] == violation
        assert out.report["notify_fd"] is None
        if expect is None:
            assert out.signal == signal.SIGSYS
        else:
            assert out.result == expect


def test_thread_can_start_inside() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
        t.start()
        t.join()
        return len(box)

    assert run(attempt).result == {"ok": 1}


@needs_notify
def test_fork_denied() -> None:
    note = assert_notified(run(lambda ctx: os.fork()), "clone")
    assert not note.args[0] & 0x10000  # no CLONE_THREAD


@needs_notify
def test_clone_thread_with_newuser_denied() -> None:
    flags = 0x10F00 | 0x10000000  # thread flags + CLONE_NEWUSER
    out = run(lambda ctx: sys(56, flags, 0, 0, 0, 0))
    assert_notified(out, "clone")


@needs_notify
def test_exec_mapping_denied_unless_dangerous_option() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
        m.close()
        return "mapped"

    assert_notified(run(attempt), "mmap")
    assert run(attempt, SandboxSpec(dangerous=("allow-exec-mappings",))).result == {"ok": "mapped"}


@needs_notify
def test_mprotect_exec_denied() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        m = mmap.mmap(-1, 4096)
        addr = ffi.cast("long", ffi.from_buffer(m))
        return sys(10, int(addr), 4096, 0x1 | 0x4)

    assert_notified(run(attempt), "mprotect")


@needs_notify
@pytest.mark.parametrize("flags", [0x1 | 0x2, 0x10], ids=["plain", "MFD_EXEC"])
def test_memfd_create_denied_the_wire_has_its_memfds(flags: int) -> None:
    """Each memfd is memory outside RLIMIT_AS (a red-team worker held 8 GiB of
    them, RSS 26 MiB): none is made after entry. The wire's large values go
    into two made before it, sealed at MAX_BLOB bytes each."""
    from protocol._wire import MAX_BLOB

    def attempt(ctx: dict[str, Any]) -> Any:
        from protocol._wire import _region

        assert _region is not None and [os.fstat(fd).st_size for fd in _region.fds] == [MAX_BLOB] * 2
        with pytest.raises(PermissionError):  # sealed: it cannot grow
            os.ftruncate(_region.fds[0], MAX_BLOB + 1)
        return sys(319, ffi.new("char[]", b"x"), flags)

    note = assert_notified(run(attempt), "memfd_create")
    assert note.args[1] == flags


@needs_notify
def test_kill_other_process_denied_self_allowed() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        os.kill(os.getpid(), 0)
        os.kill(1, 0)

    note = assert_notified(run(attempt), "kill")
    assert note.args[0] == 1


@needs_notify
@pytest.mark.parametrize("cmd", [1, 2, 4], ids=["GLOBAL", "GLOBAL_EXPEDITED", "REGISTER_GLOBAL_EXPEDITED"])
def test_membarrier_only_on_its_own_threads(cmd: int) -> None:
    """QUERY and the private commands are the worker's own business; the
    global ones reach every CPU (an RCU grace period of the whole system a
    call, or IPIs to processes registered for them)."""

    def attempt(ctx: dict[str, Any]) -> Any:
        assert sys(324, 0, 0, 0) & 0x8  # QUERY: PRIVATE_EXPEDITED is offered
        assert sys(324, 16, 0, 0) == 0  # REGISTER_PRIVATE_EXPEDITED
        assert sys(324, 8, 0, 0) == 0  # PRIVATE_EXPEDITED
        return sys(324, cmd, 0, 0)

    note = assert_notified(run(attempt), "membarrier")
    assert note.args[0] == cmd


@needs_notify
def test_prctl_limited() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        assert lib.prctl(15, int(ffi.cast("long", ffi.new("char[]", b"w"))), 0, 0, 0) == 0  # PR_SET_NAME
        assert lib.prctl(4, 0, 0, 0, 0) == 0  # SET_DUMPABLE(0): only tightens
        return lib.prctl(4, 1, 0, 0, 0)  # SET_DUMPABLE(1): loosens

    note = assert_notified(run(attempt), "prctl")
    assert note.args[:2] == (4, 1)


@needs_notify
def test_second_seccomp_filter_denied() -> None:
    out = run(lambda ctx: sys(317, 1, 8, 0))
    assert_notified(out, "seccomp")


@needs_notify
def test_madvise_hwpoison_denied() -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        m = mmap.mmap(-1, 4096)
        addr = int(ffi.cast("long", ffi.from_buffer(m)))
        assert sys(28, addr, 4096, 4) == 0  # MADV_DONTNEED
        return sys(28, addr, 4096, 100)  # MADV_HWPOISON

    assert_notified(run(attempt), "madvise")


@needs_notify
def test_unknown_future_syscalls_hit_default() -> None:
    assert_notified(run(lambda ctx: sys(470)), "syscall_470")
    assert_notified(run(lambda ctx: sys(462, 0, 0, 0)), "mseal")  # unknown to libseccomp 2.5.4


def test_python_serve_loop_primitives_work() -> None:
    import msgpack

    def attempt(ctx: dict[str, Any]) -> Any:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        from protocol._wire import _region

        assert _region is not None  # (memfd_create is denied: the wire's own memfds)
        fd = os.dup(_region.fds[0])
        os.write(fd, b"x" * 100_000)
        os.fstat(fd)
        socket.send_fds(a, [msgpack.packb({"n": 1})], [fd])
        poller = select.poll()
        poller.register(b, select.POLLIN)
        assert poller.poll(1000)
        msg, fds, _, _ = socket.recv_fds(b, 1000, 4)
        got = os.pread(fds[0], 10, 0)
        big = bytearray(64 << 20)
        del big
        os.urandom(8)
        time.sleep(0.001)
        return [msgpack.unpackb(msg), got.decode()]

    assert run(attempt).result == {"ok": [{"n": 1}, "x" * 10]}


# ------------------------------------------------------- notify plumbing ----

@needs_notify
def test_notify_id_valid_and_respond() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    prepared = prepare(SandboxSpec(violation="errno"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        parent.close()
        try:
            rep = enter(prepared, [child.fileno()])
            socket.send_fds(child, [b"r"], [rep["notify_fd"]])
            os.close(rep["notify_fd"])
            child.send(str(sys(101, 0, 0, 0, 0)).encode())
        finally:
            os._exit(0)
    child.close()
    _, fds, _, _ = socket.recv_fds(parent, 10, 1)
    lfd = fds[0]
    try:
        assert select.select([lfd], [], [], 5)[0]
        note = _notify.receive(lfd)
        assert note.name == "ptrace" and note.pid == pid
        assert _notify.id_valid(lfd, note.id)
        _notify.respond_errno(lfd, note.id, errno.EACCES)
        assert not _notify.id_valid(lfd, note.id)
        assert parent.recv(100) == str(-errno.EACCES).encode()
        with pytest.raises(OSError):
            _notify.respond_errno(lfd, note.id, errno.EPERM)
    finally:
        os.waitpid(pid, 0)
        os.close(lfd)
        parent.close()
    assert _notify.syscall_name(59) == "execve" and _notify.syscall_name(0x40000000 | 59) == "x32:execve"


def test_prepare_is_cached_and_entry_is_fast() -> None:
    spec = SandboxSpec(namespaces=False)
    assert prepare(spec) is prepare(spec)
    assert isinstance(prepare(spec), _entry.Prepared)
    out = run(lambda ctx: None, spec)
    assert out.report is not None and out.report["entry_us"] < 50_000


@pytest.mark.parametrize("nth", [1, 2])
def test_the_namespace_probe_interrupted_as_it_ends_leaves_no_zombie(nth: int) -> None:
    """The namespace probe forks a child; a Ctrl-C raised as it closed an end
    of its pipe (once the close had returned: the write end's, or the read
    end's before the wait) skipped the wait, and the child was left a zombie
    of the broker's for good, one more at each interrupted probe (a probe:
    8 after 40 interrupted calls)."""
    import sys

    from worker.sandbox import _probe

    closes: list[int] = []

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and frame.f_code is _probe._namespaces.__code__ \
                and getattr(arg, "__name__", "") == "close":
            closes.append(frame.f_locals["pid"])
            if len(closes) == nth:
                sys.setprofile(None)
                raise KeyboardInterrupt

    sys.setprofile(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            _probe._namespaces()
    finally:
        sys.setprofile(None)
    assert len(closes) == nth
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(closes[0], os.WNOHANG)
