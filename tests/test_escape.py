"""Escape suite: one fresh sandboxed worker per case, spawned the documented
way (``broker.spawn``), each case naming the layer that must stop it. After
every case the broker must still answer and hold exactly the fds it held
before. Then the ablation run: the filesystem cases again with seccomp off
(Landlock alone) and with Landlock off (seccomp alone), where both hold.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _escape_workers import (
    Attacker,
    Int80Attacker,
    SetupAttacker,
)
from conftest import READ, assert_no_fd_left, open_fds, spare_made_ahead

from broker import Broker, Policy
from protocol import PolicyViolation, Rights, WorkerCrashed
from worker.sandbox import probe

PROBE = probe()
pytestmark = pytest.mark.skipif(not (PROBE["seccomp"] and PROBE["user_notif"]),
                                reason="needs seccomp user notification")
needs_landlock = pytest.mark.skipif(PROBE["landlock_abi"] < 6, reason="ablation needs Landlock ABI >= 6")

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
    Case("lifeline_setsig", "seccomp (fcntl allowlist)", V("fcntl")),
    Case("lifeline_reopen", "seccomp (openat AT_FDCWD) + empty root", V("openat")),
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
    ("lifeline_reopen", None, E("EACCES"), V("openat")),  # Landlock: the pipe is 0400 (broker._lifeline)
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
