"""Rights pinned to fd numbers (``SandboxSpec.fd_rules``): the seccomp layer.

Linux keeps no rights mask per fd, so for grants held at sandbox entry the
filter keys on the fd number. Every kernel case forks a fresh child that
enters the sandbox and tries one thing; the layer that must stop it is
seccomp (Landlock does not see operations on fds opened before entry), so a
denial is the filter's default action: the parent, playing the broker's
notify supervisor, checks which syscall was stopped. A few cases rerun with
seccomp off to show that nothing else stops them. The compile-level cases run
the BPF in a small emulator of the kernel's classic BPF.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from test_sandbox_layers import Outcome, assert_notified, needs_landlock, needs_notify, run
from test_sandbox_layers import sys as raw

from protocol import ProtocolError, Rights, SandboxError
from worker.sandbox import Limits, SandboxSpec, _bpf, _seccomp, prepare, probe
from worker.sandbox._libc import ffi
from worker.sandbox._seccomp_rules import (
    GROUPS,
    GROUPS_WEAKEN,
    PID,
    PINNED_NEEDS,
    Cond,
    Rule,
    dup_safe,
)
from worker.sandbox._syscalls import NUMBERS

PROBE = probe()
pytestmark = pytest.mark.skipif(not PROBE["seccomp"], reason="kernel lacks seccomp")

R = Rights
AT_EMPTY_PATH = 0x1000
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE = 1, 2
FIGETBSZ = 2  # a harmless ioctl on regular files, not in the base allowlist
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
RWF_NOAPPEND = 0x20
FALLOC_FL_KEEP_SIZE = 0x01
CONTENT = b"0123456789"


# ------------------------------------------------------------ harness ----

def prepared_for(spec: SandboxSpec) -> Any:
    """prepare(spec), with the filter compiled for the spec's pins.

    Until ``_entry.prepare`` passes ``spec.fd_rules`` to ``compile_filter``
    this swaps in the pinned filter; afterwards it is a no-op (see
    test_prepare_compiles_the_pins)."""
    p = prepare(spec)
    if not spec.seccomp:
        return p
    want = _seccomp.compile_filter(spec.effective_groups(), spec.dangerous, spec.fd_rules)
    return p if p.compiled == want else replace(p, compiled=want)


Grant = tuple[str, int, Rights]  # (name beneath tmp_path, open flags, rights pinned)


@dataclass
class Pinned(Outcome):
    fds: list[int] = field(default_factory=list)  # the pinned numbers, as the child held them


def pinned(tmp: Path, grants: Sequence[Grant], attempt: Callable[[dict[str, Any]], Any], *, answer: str = "kill",
           **spec_kw: Any) -> Pinned:
    """Open each grant in the parent (so its number is known when the filter
    is compiled), pin it, and run ``attempt`` in a fresh sandboxed child with
    ``ctx["fd"]`` = the first grant's fd and ``ctx["fds"]`` = all of them."""
    fds = []
    for name, flags, _ in grants:
        path = tmp / name
        if flags & os.O_DIRECTORY:
            path.mkdir(exist_ok=True)
            (path / "entry").write_bytes(CONTENT)
        elif not path.exists():
            path.write_bytes(CONTENT)
        fds.append(os.open(path, flags | os.O_CLOEXEC))
    spec_kw.setdefault("namespaces", False)  # not the layer under test; keeps file ownership simple
    spec = SandboxSpec(fd_rules=tuple((fd, int(r)) for fd, (_, _, r) in zip(fds, grants, strict=True)), **spec_kw)
    try:
        out = run(attempt, prepared=prepared_for(spec), setup=lambda: {"fd": fds[0], "fds": fds, "keep": fds},
                  answer=answer)
        return Pinned(**vars(out), fds=fds)
    finally:
        for fd in fds:
            os.close(fd)


def iov(buf: Any) -> Any:
    return ffi.new("uint64_t[2]", [int(ffi.cast("uint64_t", buf)), len(buf)])


def ok(out: Outcome) -> Any:
    """The attempt ran to the end and seccomp stopped nothing."""
    assert not out.notes, f"seccomp stopped {out.first.name}{out.first.args}"
    assert out.result is not None and "ok" in out.result, out.result
    return out.result["ok"]



def scratch() -> int:
    """A new unpinned fd in the sandboxed child. memfd_create is denied there: a dup
    of one of the wire's two memfds, made before entry (regular files, sealed at
    their size)."""
    from protocol._wire import _region

    assert _region is not None
    return os.dup(_region.fds[1])

# ------------------------------------------------- every right, both ways ----

def _mmap_shared_read(fd: int) -> Any:
    addr = raw(9, 0, 4096, PROT_READ, MAP_SHARED, fd, 0)
    assert addr > 0, addr
    assert ffi.buffer(ffi.cast("char *", addr), 4)[:] == CONTENT[:4]
    return raw(11, addr, 4096)


def _setlk(fd: int) -> Any:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fcntl(F_SETLK)
    return "locked"


def _stat_buf() -> Any:
    return ffi.new("char[256]")


RW, RO, DIR = os.O_RDWR, os.O_RDONLY, os.O_RDONLY | os.O_DIRECTORY
# (right, open flags, syscall the filter stops without the right, what the attempt returns with the right,
#  the attempt on the pinned fd)
RIGHT_CASES: list[tuple[Rights, int, str, Any, Callable[[int], Any]]] = [
    (R.SEEK, RW, "lseek", 3, lambda fd: os.lseek(fd, 3, os.SEEK_SET)),
    (R.SEEK, RW, "pread64", "34", lambda fd: os.pread(fd, 2, 3).decode()),
    (R.SEEK, RW, "pwrite64", 1, lambda fd: os.pwrite(fd, b"x", 3)),
    (R.SEEK, RW, "preadv", 2, lambda fd: raw(295, fd, iov(ffi.new("char[2]")), 1, 3, 0)),  # os.preadv: preadv2
    (R.SEEK, RW, "pwritev", 2, lambda fd: raw(296, fd, iov(ffi.new("char[]", b"x")), 1, 3, 0)),
    (R.SEEK, RW, "preadv2", 2, lambda fd: raw(327, fd, iov(ffi.new("char[2]")), 1, 3, 0, 0)),
    (R.SEEK, RW, "pwritev2", 2, lambda fd: raw(328, fd, iov(ffi.new("char[]", b"x")), 1, 3, 0, 0)),
    (R.FSTAT, RO, "newfstatat", 10, lambda fd: os.fstat(fd).st_size),  # glibc fstat
    (R.FSTAT, RO, "fstat", 0, lambda fd: raw(5, fd, _stat_buf())),
    (R.FSTAT, RO, "statx", 0, lambda fd: raw(332, fd, ffi.new("char[]", b""), AT_EMPTY_PATH, 0xFFF, _stat_buf())),
    (R.FTRUNCATE, RW, "ftruncate", None, lambda fd: os.ftruncate(fd, 4)),
    (R.FTRUNCATE, RW, "fallocate", 0, lambda fd: raw(285, fd, 0x3, 0, 2)),  # PUNCH_HOLE|KEEP_SIZE
    (R.FSYNC, RW, "fsync", None, os.fsync),
    (R.FSYNC, RW, "fdatasync", None, os.fdatasync),
    (R.FSYNC, RW, "sync_file_range", 0, lambda fd: raw(277, fd, 0, 0, 0)),
    (R.FSTATFS, RO, "fstatfs", True, lambda fd: os.fstatvfs(fd).f_bsize > 0),
    (R.FCHMOD, RO, "fchmod", None, lambda fd: os.fchmod(fd, 0o640)),
    (R.FCHOWN, RO, "fchown", None, lambda fd: os.fchown(fd, -1, -1)),
    (R.FLOCK, RO, "flock", None, lambda fd: fcntl.flock(fd, fcntl.LOCK_SH)),
    (R.FLOCK, RW, "fcntl", "locked", _setlk),
    (R.FUTIMES, RO, "utimensat", None, lambda fd: os.utime(fd)),  # futimens: utimensat(fd, NULL, ...)
    (R.READ, DIR, "getdents64", True, lambda fd: raw(217, fd, ffi.new("char[4096]"), 4096) > 0),
    (R.MMAP_R, RO, "mmap", 0, _mmap_shared_read),
    (R.IOCTL, RO, "ioctl", 0, lambda fd: raw(16, fd, FIGETBSZ, ffi.new("int *"))),
    (R.FCNTL, RO, "fcntl", 0, lambda fd: fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)),
]


def _base_rights(flags: int) -> Rights:
    if flags & os.O_DIRECTORY:
        return R.LOOKUP
    return R.READ | (R.WRITE if flags & os.O_RDWR else R.NONE)


def _without(rights: Rights, right: Rights) -> Rights:
    """``rights`` minus the bit that makes ``right`` (MMAP_R -> MMAP: keep READ and SEEK)."""
    key = right if right in (R.READ, R.SEEK) else right & ~(R.READ | R.SEEK | R.WRITE)
    return rights & ~key


@pytest.mark.parametrize(("right", "flags", "name", "expect", "op"), RIGHT_CASES,
                         ids=[f"{c[0].describe()}-{c[2]}" for c in RIGHT_CASES])
def test_right_present_allows(tmp_path: Path, right: Rights, flags: int, name: str, expect: Any,
                              op: Callable[[int], Any]) -> None:
    got = ok(pinned(tmp_path, [("f", flags, _base_rights(flags) | right)], lambda ctx: op(ctx["fd"])))
    # (a negative int is -errno from a raw syscall; True is not 1)
    assert (type(got), got) == (type(expect), expect), f"{name} returned {got!r}"


@needs_notify
@pytest.mark.parametrize(("right", "flags", "name", "op"), [(c[0], c[1], c[2], c[4]) for c in RIGHT_CASES],
                         ids=[f"{c[0].describe()}-{c[2]}" for c in RIGHT_CASES])
def test_right_absent_denied_by_seccomp(tmp_path: Path, right: Rights, flags: int, name: str,
                                        op: Callable[[int], Any]) -> None:
    rights = _without(_base_rights(flags) | right, right)
    out = pinned(tmp_path, [("f", flags, rights)], lambda ctx: op(ctx["fd"]))
    note = assert_notified(out, name)
    assert note.args[4 if name == "mmap" else 0] & 0xFFFFFFFF == out.fds[0]  # stopped on the pinned number


@pytest.mark.parametrize(("name", "op", "expect"), [
    ("lseek", lambda fd: os.lseek(fd, 3, os.SEEK_SET), 3),
    ("ftruncate", lambda fd: os.ftruncate(fd, 4), None),
    ("fsync", os.fsync, None),
])
def test_ablation_seccomp_off_nothing_else_stops_it(tmp_path: Path, name: str, op: Callable[[int], Any],
                                                   expect: Any) -> None:
    # the same pinned fd, no rights beyond READ|WRITE: with seccomp off the operation succeeds,
    # so the filter is the only layer that enforces these rights
    out = pinned(tmp_path, [("f", RW, R.READ | R.WRITE)], lambda ctx: op(ctx["fd"]), seccomp=False)
    assert ok(out) == expect


def test_errno_mode_denies_with_eperm(tmp_path: Path) -> None:
    """Without a listener the filter's own ERRNO(EPERM) answers, and the worker goes on."""
    fds = []
    path = tmp_path / "f"
    path.write_bytes(CONTENT)
    fds.append(os.open(path, os.O_RDONLY))
    spec = SandboxSpec(violation="errno", namespaces=False, fd_rules=((fds[0], int(R.READ)),))
    p = replace(prepared_for(spec), notify=False)
    try:
        def attempt(ctx: dict[str, Any]) -> Any:
            fd = ctx["fd"]
            return [raw(8, fd, 0, 0), raw(3, fd), os.read(fd, 3).decode()]  # lseek, close, read

        out = run(attempt, prepared=p, setup=lambda: {"fd": fds[0], "keep": fds})
    finally:
        os.close(fds[0])
    assert out.result == {"ok": [-errno.EPERM, -errno.EPERM, "012"]}
    assert out.report is not None and out.report["seccomp"] == "errno"


# ------------------------------------------------------ the pinned slot ----

@needs_notify
def test_close_of_pinned_fd_denied(tmp_path: Path) -> None:
    out = pinned(tmp_path, [("f", RO, R.READ | R.SEEK | R.FSTAT)], lambda ctx: os.close(ctx["fd"]))
    assert assert_notified(out, "close").args[0] == out.fds[0]
    # control: with seccomp off nothing else keeps the slot
    out = pinned(tmp_path, [("f", RO, R.READ)], lambda ctx: os.close(ctx["fd"]), seccomp=False)
    assert ok(out) is None


@needs_notify
def test_close_with_junk_high_bits_denied(tmp_path: Path) -> None:
    out = pinned(tmp_path, [("f", RO, R.READ)], lambda ctx: raw(3, (0xDEAD << 32) | ctx["fd"]))
    assert_notified(out, "close")


@needs_notify
@pytest.mark.parametrize("inheritable", [True, False], ids=["dup2", "dup3"])
def test_dup_weak_fd_onto_pinned_slot_denied(tmp_path: Path, inheritable: bool) -> None:
    """The pinned-slot attack: put a weaker fd under a pinned number, then use the number's rights."""
    def attempt(ctx: dict[str, Any]) -> Any:
        weak = scratch()
        os.dup2(weak, ctx["fd"], inheritable=inheritable)
        return os.fsync(ctx["fd"])

    out = pinned(tmp_path, [("f", RW, R.READ | R.WRITE | R.SEEK | R.FSTAT | R.FTRUNCATE | R.FSYNC)], attempt)
    note = assert_notified(out, "dup2" if inheritable else "dup3")
    assert note.args[1] == out.fds[0]


@needs_notify
def test_dup2_onto_unpinned_slot_allowed(tmp_path: Path) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        a, b = scratch(), scratch()
        os.dup2(a, b)
        os.dup2(a, b, inheritable=False)
        return "ok"

    assert ok(pinned(tmp_path, [("f", RO, R.READ | R.SEEK | R.FSTAT)], attempt)) == "ok"


@needs_notify
@pytest.mark.parametrize(("span", "expect"), [
    (lambda fd: (fd, fd), "denied"),
    (lambda fd: (0, 0xFFFFFFFF), "denied"),
    (lambda fd: (fd, 0xFFFFFFFF), "denied"),
    (lambda fd: (fd - 1, fd), "denied"),
    (lambda fd: (fd + 900, fd + 1000), 0),  # beyond every fd: nothing to close
    (lambda fd: (fd + 1, fd), -errno.EINVAL),  # first > last: EINVAL from the kernel
], ids=["N..N", "all", "N..max", "N-1..N", "above", "inverted"])
def test_close_range_over_a_pinned_fd_denied(tmp_path: Path, span: Callable[[int], tuple[int, int]],
                                             expect: str | int) -> None:
    out = pinned(tmp_path, [("f", RO, R.READ)], lambda ctx: raw(436, *span(ctx["fd"]), 0))
    if expect == "denied":
        assert_notified(out, "close_range")
    else:
        assert ok(out) == expect


@needs_notify
def test_close_range_with_high_word_in_first_denied(tmp_path: Path) -> None:
    # close_range takes unsigned ints: (1<<32)|fd is fd to the kernel, and so to the filter
    out = pinned(tmp_path, [("f", RO, R.READ)], lambda ctx: raw(436, (1 << 32) | ctx["fd"], ctx["fd"], 0))
    assert_notified(out, "close_range")


def test_close_range_around_pins_allowed(tmp_path: Path) -> None:
    grants: list[Grant] = [("a", RO, R.READ), ("b", RO, R.READ), ("c", RO, R.READ)]

    def attempt(ctx: dict[str, Any]) -> Any:
        top = 180  # clear of the pins and of the test's channel; below RLIMIT_NOFILE (256)
        assert max(ctx["fds"]) < 100
        for spare in (top, top + 50):
            os.dup2(scratch(), spare)
        return [raw(436, top, top, 0), raw(436, top + 10, top + 100, 0)]

    assert ok(pinned(tmp_path, grants, attempt)) == [0, 0]


# ------------------------------------------------ duplicates of a pin ----

@needs_notify
@pytest.mark.parametrize(("how", "name"), [
    (lambda fd: raw(32, fd), "dup"),
    (os.dup, "fcntl"),  # CPython: fcntl(F_DUPFD_CLOEXEC)
    (lambda fd: fcntl.fcntl(fd, fcntl.F_DUPFD, 0), "fcntl"),
    (lambda fd: os.dup2(fd, 200), "dup2"),
    (lambda fd: os.dup2(fd, 200, inheritable=False), "dup3"),
])
def test_dup_of_pin_without_seek_denied(tmp_path: Path, how: Callable[[int], Any], name: str) -> None:
    """An unpinned duplicate could lseek/fstat/ftruncate freely: no dup from a pin that lacks those rights."""
    def attempt(ctx: dict[str, Any]) -> Any:
        return os.lseek(how(ctx["fd"]), 3, os.SEEK_SET)

    out = pinned(tmp_path, [("f", RO, R.READ | R.FSTAT)], attempt)
    assert_notified(out, name)


def test_dup_of_pin_holding_every_unpinned_right_allowed(tmp_path: Path) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        dup = os.dup(ctx["fd"])
        return [os.lseek(dup, 3, os.SEEK_SET), raw(32, ctx["fd"]) > 0]

    assert ok(pinned(tmp_path, [("f", RO, R.READ | R.SEEK | R.FSTAT)], attempt)) == [3, True]


@needs_notify
def test_socketpair_loopback_denied_while_a_pin_may_not_be_duplicated(tmp_path: Path) -> None:
    """SCM_RIGHTS to ourselves would hand back an unpinned duplicate, so no socketpair then."""
    def attempt(ctx: dict[str, Any]) -> Any:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socket.send_fds(a, [b"x"], [ctx["fd"]])
        _, fds, _, _ = socket.recv_fds(b, 1, 1)
        return os.lseek(fds[0], 3, os.SEEK_SET)

    assert_notified(pinned(tmp_path, [("f", RO, R.READ | R.FSTAT)], attempt), "socketpair")
    # a pin holding SEEK|FSTAT|READ gains nothing from a duplicate: socketpair stays
    assert ok(pinned(tmp_path, [("f", RO, R.READ | R.SEEK | R.FSTAT)], attempt)) == 3


@needs_notify
def test_listdir_of_pinned_dir_needs_a_dup_safe_grant(tmp_path: Path) -> None:
    # os.listdir(fd) works on a duplicate (fcntl F_DUPFD_CLOEXEC), which glibc fstats, reads and rewinds
    # (lseek): a directory grant needs READ|SEEK|FSTAT for it
    def attempt(ctx: dict[str, Any]) -> Any:
        return os.listdir(ctx["fd"])

    assert ok(pinned(tmp_path, [("d", DIR, R.READ | R.LOOKUP | R.SEEK | R.FSTAT)], attempt)) == ["entry"]
    assert_notified(pinned(tmp_path, [("d", DIR, R.READ | R.LOOKUP | R.FSTAT)], attempt), "fcntl")


# ------------------------------------------------------------- append ----

APPEND_W = R.WRITE | R.APPEND | R.SEEK | R.FSTAT


@needs_notify
@pytest.mark.parametrize("extra", [R.NONE, R.FCNTL], ids=["no-FCNTL", "FCNTL"])
def test_clearing_o_append_denied(tmp_path: Path, extra: Rights) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        fd = ctx["fd"]
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND | os.O_NONBLOCK)  # keeping O_APPEND is fine
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)

    note = assert_notified(pinned(tmp_path, [("f", os.O_WRONLY | os.O_APPEND, APPEND_W | extra)], attempt), "fcntl")
    assert note.args[1:3] == (fcntl.F_SETFL, os.O_NONBLOCK)


def test_fcntl_right_sets_any_flags_without_append(tmp_path: Path) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        fcntl.fcntl(ctx["fd"], fcntl.F_SETFL, os.O_NONBLOCK)
        return fcntl.fcntl(ctx["fd"], fcntl.F_GETFL) & os.O_NONBLOCK != 0

    assert ok(pinned(tmp_path, [("f", RO, R.READ | R.FCNTL)], attempt)) is True


@needs_notify
@pytest.mark.parametrize("flag", [os.O_DIRECT, os.O_NOATIME, os.O_ASYNC], ids=["O_DIRECT", "O_NOATIME", "O_ASYNC"])
@pytest.mark.parametrize("pinned_fd", [True, False], ids=["pinned", "later"])
def test_status_flags_of_the_shared_open_file_need_fcntl(tmp_path: Path, flag: int, pinned_fd: bool) -> None:
    """The status flags are the open file's, which the broker and other
    workers share: F_SETFL of O_APPEND|O_DIRECT, allowed on any fd, made
    the broker's and a sibling's reads fail with EINVAL (red-team round
    35). Without FCNTL, F_SETFL may add O_APPEND and O_NONBLOCK only."""

    def attempt(ctx: dict[str, Any]) -> Any:
        fd = ctx["fd"] if pinned_fd else scratch()
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND | os.O_NONBLOCK)  # (what the filter allowed before: still)
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND | flag)

    note = assert_notified(pinned(tmp_path, [("f", RO, R.READ | R.SEEK | R.FSTAT)], attempt), "fcntl")
    assert note.args[1:3] == (fcntl.F_SETFL, os.O_APPEND | flag)


@needs_notify
@pytest.mark.parametrize("rights", [R.READ | R.FCNTL, APPEND_W | R.FCNTL], ids=["FCNTL", "FCNTL+APPEND"])
def test_fcntl_right_sets_the_shared_status_flags(tmp_path: Path, rights: Rights) -> None:
    """FCNTL is the right to change them (as Capsicum's CAP_FCNTL with
    F_SETFL), keeping O_APPEND where APPEND was granted."""

    def attempt(ctx: dict[str, Any]) -> Any:
        fd = ctx["fd"]
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND | os.O_NOATIME)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NOATIME
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NOATIME)  # without O_APPEND: only where APPEND was not granted
        return fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_APPEND | os.O_NOATIME)

    flags = os.O_WRONLY | os.O_APPEND if R.APPEND in rights else RO
    out = pinned(tmp_path, [("f", flags, rights)], attempt)
    if R.APPEND in rights:
        assert assert_notified(out, "fcntl").args[1:3] == (fcntl.F_SETFL, os.O_NOATIME)
    else:
        assert ok(out) == os.O_NOATIME


@needs_notify
def test_pwritev2_noappend_denied_on_every_fd(tmp_path: Path) -> None:
    # RWF_NOAPPEND (6.9+) writes at the offset even on an O_APPEND fd: denied for pinned and unpinned fds
    def attempt(ctx: dict[str, Any]) -> Any:
        return os.pwritev(ctx["fd"], [b"XX"], 0, RWF_NOAPPEND)

    note = assert_notified(pinned(tmp_path, [("f", os.O_WRONLY | os.O_APPEND, APPEND_W)], attempt), "pwritev2")
    assert note.args[5] == RWF_NOAPPEND
    assert_notified(run(lambda ctx: os.pwritev(scratch(), [b"x"], 0, RWF_NOAPPEND)), "pwritev2")
    assert (tmp_path / "f").read_bytes() == CONTENT


@needs_notify
def test_append_grant_gets_no_shared_mapping(tmp_path: Path) -> None:
    # a shared mapping of a writable fd could be mprotect()ed writable: with APPEND only private ones
    rights = R.READ | R.WRITE | R.APPEND | R.MMAP_R | R.MMAP_W | R.FSTAT

    def attempt(ctx: dict[str, Any]) -> Any:
        fd = ctx["fd"]
        addr = raw(9, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0)
        assert addr > 0 and raw(11, addr, 4096) == 0
        return raw(9, 0, 4096, PROT_READ, MAP_SHARED, fd, 0)

    note = assert_notified(pinned(tmp_path, [("f", os.O_RDWR | os.O_APPEND, rights)], attempt), "mmap")
    assert note.args[3] == MAP_SHARED


# --------------------------------------------------------------- mmap ----

@needs_notify
def test_shared_writable_mapping_of_read_grant_denied(tmp_path: Path) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        fd = ctx["fd"]
        addr = raw(9, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0)  # copy-on-write: fine
        assert addr > 0 and raw(11, addr, 4096) == 0
        return raw(9, 0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)

    # even on an fd the kernel would let write (opened O_RDWR): the rights say read
    for flags in (RO, RW):
        note = assert_notified(pinned(tmp_path, [("f", flags, R.READ | R.MMAP_R)], attempt), "mmap")
        assert note.args[2:4] == (PROT_READ | PROT_WRITE, MAP_SHARED)


def test_shared_writable_mapping_with_mmap_w(tmp_path: Path) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        addr = raw(9, 0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ctx["fd"], 0)
        ffi.cast("char *", addr)[0] = b"W"
        raw(26, addr, 4096, 4)  # msync(MS_SYNC)
        return raw(11, addr, 4096)

    assert ok(pinned(tmp_path, [("f", RW, R.MMAP_R | R.MMAP_W)], attempt)) == 0
    assert (tmp_path / "f").read_bytes()[:1] == b"W"


@needs_notify
def test_exec_mapping_of_pin_needs_mmap_x_and_the_option(tmp_path: Path) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        addr = raw(9, 0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, ctx["fd"], 0)
        return addr > 0

    assert_notified(pinned(tmp_path, [("f", RO, R.READ | R.MMAP_R | R.MMAP_X)], attempt), "mmap")
    assert_notified(pinned(tmp_path, [("f", RO, R.READ | R.MMAP_R)], attempt, dangerous=("allow-exec-mappings",)),
                    "mmap")
    assert ok(pinned(tmp_path, [("f", RO, R.READ | R.MMAP_R | R.MMAP_X)], attempt,
                     dangerous=("allow-exec-mappings",))) is True


def test_python_mmap_module_on_a_pin(tmp_path: Path) -> None:
    # mmap.mmap(fd) does fstat(fd), fcntl(fd, F_DUPFD_CLOEXEC) and mmap(fd): needs FSTAT and a dup-safe pin
    def attempt(ctx: dict[str, Any]) -> Any:
        m = mmap.mmap(ctx["fd"], 0, prot=mmap.PROT_READ)
        data = m[:4]
        m.close()
        return data.decode()

    assert ok(pinned(tmp_path, [("f", RO, R.READ | R.SEEK | R.FSTAT | R.MMAP_R)], attempt)) == "0123"


# ------------------------------------------------------------- ioctl ----

@needs_notify
@pytest.mark.parametrize("cmd", [TIOCSTI, TIOCLINUX, (1 << 32) | TIOCSTI])
def test_ioctl_right_still_excludes_tty_injection(tmp_path: Path, cmd: int) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        assert raw(16, ctx["fd"], FIGETBSZ, ffi.new("int *")) == 0
        return raw(16, ctx["fd"], cmd, ffi.new("char *", b"x"))

    note = assert_notified(pinned(tmp_path, [("f", RO, R.READ | R.IOCTL)], attempt), "ioctl")
    assert note.args[1] == cmd


# -------------------------------------------------- fstat on a directory ----

@needs_landlock
@needs_notify
def test_fstatat_dot_on_dir_pin_needs_fstat(tmp_path: Path) -> None:
    # newfstatat(N, ".", 0) stats the directory itself: without FSTAT it is denied whatever the flags
    def attempt(ctx: dict[str, Any]) -> Any:
        return os.stat(".", dir_fd=ctx["fd"]).st_mode != 0

    grants: list[Grant] = [("d", DIR, R.READ | R.LOOKUP)]
    note = assert_notified(pinned(tmp_path, grants, attempt, syscall_groups=("@fs-at",)), "newfstatat")
    assert note.args[3] == 0
    grants = [("d", DIR, R.READ | R.LOOKUP | R.FSTAT)]
    assert ok(pinned(tmp_path, grants, attempt, syscall_groups=("@fs-at",))) is True


# ------------------------------------------------------------- splice ----

@needs_notify
def test_positional_copy_from_pin_without_seek_denied(tmp_path: Path) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        dst = ctx["fds"][1]  # same filesystem: copy_file_range between superblocks is EXDEV
        n = os.copy_file_range(ctx["fd"], dst, 4)  # from the current position: a plain read
        return [n, os.copy_file_range(ctx["fd"], dst, 4, 0)]  # at offset 0: needs SEEK

    dst: Grant = ("g", RW, R.READ | R.WRITE | R.SEEK | R.FSTAT | R.FTRUNCATE)
    out = pinned(tmp_path, [("f", RO, R.READ), dst], attempt, syscall_groups=("@splice",))
    note = assert_notified(out, "copy_file_range")
    assert note.args[0] == out.fds[0] and note.args[1] != 0
    out = pinned(tmp_path, [("f", RO, R.READ | R.SEEK), dst], attempt, syscall_groups=("@splice",))
    assert ok(out) == [4, 4]


# ------------------------------------------------------------- @sched ----

@needs_notify
@pytest.mark.parametrize("which, who, call", [
    (0, 0, "get"), (0, 0, "set"),  # PRIO_PROCESS of itself: allowed
    (2, 0, "set"),  # PRIO_USER, who 0: every process of the caller's uid (the broker, its siblings)
    (1, 0, "set"),  # PRIO_PGRP
    (0, 1, "get"),  # another pid: whether it exists, and its nice
    (2, 0, "get"),
])
def test_sched_group_reaches_this_process_alone(tmp_path: Path, which: int, who: int, call: str) -> None:
    """setpriority(PRIO_USER, 0, 19) reniced every process of the worker's
    uid, the broker included; getpriority of any pid said whether it exists
    (red-team round 17)."""
    def attempt(ctx: dict[str, Any]) -> Any:
        if call == "get":
            return raw(140, which, who)  # getpriority: 20 - nice
        # setpriority: nice 1 on itself; 0 elsewhere, so that a filter that let it through changes nothing
        return raw(141, which, who, 1 if (which, who) == (0, 0) else 0)

    out = pinned(tmp_path, [("f", RO, R.READ)], attempt, syscall_groups=("@sched",))
    if (which, who) == (0, 0):
        assert ok(out) == (20 if call == "get" else 0)
    else:
        note = assert_notified(out, "getpriority" if call == "get" else "setpriority")
        assert note.args[:2] == (which, who)


# ------------------------------------------------------- group weakening ----

@needs_notify
def test_fd_metadata_group_opens_unpinned_fds_only(tmp_path: Path) -> None:
    assert GROUPS_WEAKEN["@fd-metadata"] == int(R.FCHMOD | R.FCHOWN | R.FUTIMES)

    def unpinned(ctx: dict[str, Any]) -> Any:
        fd = scratch()
        os.fchmod(fd, 0o600)
        os.utime(fd)
        return "changed"

    grants: list[Grant] = [("f", RO, R.READ | R.SEEK | R.FSTAT | R.FCHMOD | R.FCHOWN | R.FUTIMES)]
    assert ok(pinned(tmp_path, grants, unpinned, syscall_groups=("@fd-metadata",))) == "changed"
    # a pinned fd without FCHMOD stays denied
    grants = [("f", RO, R.READ | R.SEEK | R.FSTAT)]
    out = pinned(tmp_path, grants, lambda ctx: os.fchmod(ctx["fd"], 0o600), syscall_groups=("@fd-metadata",))
    assert_notified(out, "fchmod")
    # and may not be duplicated, since a duplicate would get fchmod from the group
    out = pinned(tmp_path, grants, lambda ctx: os.fchmod(os.dup(ctx["fd"]), 0o600), syscall_groups=("@fd-metadata",))
    assert_notified(out, "fcntl")


# -------------------------------------------------------- unpinned fds ----

@needs_notify
@pytest.mark.parametrize("with_pins", [False, True], ids=["no-pins", "pins"])
@pytest.mark.parametrize(("name", "op"), [
    ("fsync", os.fsync),
    ("fdatasync", os.fdatasync),
    ("fstatfs", os.fstatvfs),
    ("mmap", lambda fd: raw(9, 0, 4096, PROT_READ, MAP_SHARED, fd, 0)),
    ("mmap", lambda fd: raw(9, 0, 4096, PROT_READ, MAP_PRIVATE, fd, 0)),
    ("fallocate", lambda fd: raw(285, fd, 0x3, 0, 2)),
])
def test_unpinned_fd_denied(tmp_path: Path, with_pins: bool, name: str, op: Callable[[int], Any]) -> None:
    def attempt(ctx: dict[str, Any]) -> Any:
        fd = scratch()
        os.write(fd, CONTENT * 500)
        return op(fd)

    if with_pins:
        everything = R.READ | R.WRITE | R.SEEK | R.FSTAT | R.FSYNC | R.FSTATFS | R.MMAP_R | R.MMAP_W | R.FTRUNCATE
        out = pinned(tmp_path, [("f", RW, everything)], attempt)
    else:
        out = run(attempt, SandboxSpec(namespaces=False))
    assert_notified(out, name)


@pytest.mark.parametrize("with_pins", [False, True], ids=["no-pins", "pins"])
def test_unpinned_fd_keeps_seek_fstat_truncate_and_anonymous_memory(tmp_path: Path, with_pins: bool) -> None:
    def attempt(fd: int) -> Any:  # a file that reached the child after entry, as a later grant does
        got = [os.lseek(fd, 2, os.SEEK_SET), os.pread(fd, 2, 0).decode(), os.fstat(fd).st_size]
        os.ftruncate(fd, 4)
        got.append(raw(285, fd, 0, 0, 8192))  # plain preallocation (mode 0)
        m = mmap.mmap(-1, 1 << 20)  # anonymous, shared
        m[:2] = b"ok"
        got.append(m[:2].decode())
        big = bytearray(64 << 20)  # malloc's mmap
        del big
        os.close(fd)
        return got

    assert ok(later_grant(tmp_path, attempt, with_pins=with_pins)) == [2, "01", 10, 0, "ok"]


# fallocate(FALLOC_FL_KEEP_SIZE) allocates blocks past EOF without changing the size, and the kernel checks
# RLIMIT_FSIZE only against a new size: on a later fd it would fill the disk past Limits.file_size.
FSIZE = 64 << 10  # Limits.file_size in these cases
PAST = 1 << 20  # an allocation past it


def later_grant(tmp: Path, attempt: Callable[[int], Any], *, with_pins: bool, answer: str = "kill") -> Outcome:
    """Run ``attempt(fd)`` on a writable file that reaches the sandboxed child by SCM_RIGHTS after entry, as
    a grant made later does (never pinned), under ``Limits(file_size=FSIZE)``. ``with_pins`` pins another
    grant as well, so that the per-fd part of the filter is compiled in."""
    later = tmp / "later"
    later.write_bytes(CONTENT)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.open(later, os.O_RDWR | os.O_CLOEXEC)
    try:
        socket.send_fds(a, [b"grant"], [fd])  # queued on b: the child receives it once in the sandbox
    finally:
        os.close(fd)
        a.close()
    pins: list[int] = []
    try:
        if with_pins:
            (tmp / "f").write_bytes(CONTENT)
            pins.append(os.open(tmp / "f", os.O_RDWR | os.O_CLOEXEC))
        spec = SandboxSpec(namespaces=False, limits=Limits(file_size=FSIZE),
                           fd_rules=tuple((p, int(R.READ | R.WRITE | R.SEEK | R.FSTAT | R.FTRUNCATE)) for p in pins))

        def received(ctx: dict[str, Any]) -> Any:
            _, fds, _, _ = socket.recv_fds(ctx["chan"], 16, 1)
            assert len(fds) == 1 and fds[0] not in pins
            return attempt(fds[0])

        return run(received, prepared=prepared_for(spec), setup=lambda: {"chan": b, "keep": [b.fileno(), *pins]},
                   answer=answer)
    finally:
        b.close()
        for p in pins:
            os.close(p)


@needs_notify
@pytest.mark.parametrize("with_pins", [False, True], ids=["no-pins", "pins"])
def test_keep_size_fallocate_on_a_later_fd_denied(tmp_path: Path, with_pins: bool) -> None:
    out = later_grant(tmp_path, lambda fd: raw(285, fd, FALLOC_FL_KEEP_SIZE, 0, PAST), with_pins=with_pins)
    note = assert_notified(out, "fallocate")
    assert note.args[1] & 0xFFFFFFFF == FALLOC_FL_KEEP_SIZE
    st = (tmp_path / "later").stat()
    assert (st.st_size, st.st_blocks * 512 < PAST) == (len(CONTENT), True)  # nothing was allocated


@needs_notify
@pytest.mark.parametrize("with_pins", [False, True], ids=["no-pins", "pins"])
def test_later_fd_keeps_plain_preallocation_under_file_size(tmp_path: Path, with_pins: bool) -> None:
    """Answered EPERM (the notify supervisor's errno answer), the worker goes on: mode 0 still preallocates,
    and the kernel holds it to RLIMIT_FSIZE."""
    def attempt(fd: int) -> Any:
        return [raw(285, fd, FALLOC_FL_KEEP_SIZE, 0, PAST), raw(285, fd, 0, 0, 8192), raw(285, fd, 0, 0, PAST),
                os.fstat(fd).st_size]

    out = later_grant(tmp_path, attempt, with_pins=with_pins, answer="errno")
    assert [n.name for n in out.notes] == ["fallocate"]
    assert out.result == {"ok": [-errno.EPERM, 0, -errno.EFBIG, 8192]}


def test_keep_size_fallocate_on_a_pin_with_ftruncate(tmp_path: Path) -> None:
    """A grant held at spawn with FTRUNCATE keeps every mode, KEEP_SIZE past Limits.file_size included."""
    def attempt(ctx: dict[str, Any]) -> Any:
        fd = ctx["fd"]
        return [raw(285, fd, FALLOC_FL_KEEP_SIZE, 0, PAST), os.fstat(fd).st_size]

    grant: Grant = ("f", RW, R.READ | R.WRITE | R.SEEK | R.FSTAT | R.FTRUNCATE)
    assert ok(pinned(tmp_path, [grant], attempt, limits=Limits(file_size=FSIZE))) == [0, len(CONTENT)]
    assert (tmp_path / "f").stat().st_blocks * 512 >= PAST


# -------------------------------------------------------- the compiler ----

def _emulate(code: bytes, nr: int, args: Sequence[int] = (), arch: int = 0xC000003E) -> tuple[int, bool]:
    """Run the filter like the kernel does. Returns (action, whether any arg word was loaded)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in [*args, 0, 0, 0, 0, 0, 0][:6]])
    insns = _bpf.disassemble(code)
    pc, a, loaded = 0, 0, False
    while True:
        op, jt, jf, k = insns[pc]
        pc += 1
        if op == _bpf.LD_W_ABS:
            loaded |= k >= 16
            a = struct.unpack_from("<I", data, k)[0]
        elif op == _bpf.ALU_AND_K:
            a &= k
        elif op == _bpf.RET_K:
            return k, loaded
        elif op == _bpf.JA:
            pc += k
        else:
            taken = {_bpf.JEQ_K: a == k, _bpf.JGE_K: a >= k, _bpf.JGT_K: a > k, _bpf.JSET_K: bool(a & k)}[op]
            pc += jt if taken else jf


ALLOW, DEFAULT = _seccomp.RET_ALLOW, _seccomp.RET_USER_NOTIF


def _verdict(compiled: _seccomp.Compiled, name: str, *args: int) -> int:
    code = _seccomp.instantiate(compiled, 4242, DEFAULT)
    return _emulate(code, NUMBERS[name], args)[0]


def _mixed_pins(n: int, seed: int = 1) -> tuple[tuple[int, int], ...]:
    rng = random.Random(seed)
    bits = [r for r in R.__members__.values() if r and r & (r - 1) == 0 and r & int(R.all())]
    return tuple((3 + 2 * i, int(sum(set(rng.sample(bits, rng.randint(0, 8)))))) for i in range(n))


@pytest.mark.parametrize("n", [0, 8, 32, 64])
def test_filter_size_with_pins(n: int) -> None:
    for seed in range(5):
        compiled = _seccomp.compile_filter(("@fs-at", "@splice", "@fd-metadata", "@flock"),
                                           ("allow-exec-mappings",), _mixed_pins(n, seed))
        # (budgets, far under the kernel's 4096; with no pins the filter has every group's rules only:
        # 399 instructions, then 404 once membarrier's command was checked, then 432 once every dirfd of
        # renameat, renameat2, linkat and symlinkat was, and renameat2's RENAME_WHITEOUT; 8 pins, up to 722)
        assert compiled.length < {0: 460, 8: 760, 32: 1500, 64: 2500}[n], compiled.length


def test_no_pins_no_per_fd_code() -> None:
    plain = _seccomp.compile_filter()
    assert plain == _seccomp.compile_filter(fd_rules=())
    code = _seccomp.instantiate(plain, 1, DEFAULT)
    for name in ("close", "lseek", "pread64", "dup2", "close_range", "getdents64", "ftruncate", "fstat"):
        action, loaded = _emulate(code, NUMBERS[name])
        assert action == ALLOW and not loaded, name  # unconditional: in the kernel's action cache


def test_pins_leave_unconcerned_syscalls_cacheable() -> None:
    compiled = _seccomp.compile_filter(fd_rules=_mixed_pins(32))
    code = _seccomp.instantiate(compiled, 1, DEFAULT)
    for name in ("read", "write", "readv", "writev", "getpid", "gettimeofday", "brk", "munmap", "poll", "recvmsg",
                 "sendmsg", "sched_yield", "epoll_wait", "pipe2", "fadvise64"):
        action, loaded = _emulate(code, NUMBERS[name])
        assert action == ALLOW and not loaded, name
    for name in ("close", "dup2", "close_range"):  # every pin concerns these
        assert _emulate(code, NUMBERS[name])[1], name


def test_futex_and_clock_ids_are_checked_by_argument() -> None:
    """futex and the clock syscalls were allowed whatever their arguments
    (so the kernel's action cache answered them): FUTEX_LOCK_PI said which
    tasks exist on the host, and a process CPU clock id read any process's
    CPU time (red-team round 16). Their first arguments are checked now."""
    c = _seccomp.compile_filter()
    for op in (0, 1, 3, 4, 5, 9, 10):  # WAIT WAKE REQUEUE CMP_REQUEUE WAKE_OP WAIT_BITSET WAKE_BITSET
        for flags in (0, 128, 256, 384):  # FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME
            assert _verdict(c, "futex", 0x1000, op | flags) == ALLOW, (op, flags)
    for op in (2, 6, 7, 8, 11, 12, 13, 14):  # FD (gone), the PI operations, and past them
        assert _verdict(c, "futex", 0x1000, op | 128) == DEFAULT, op
    cpu = lambda pid, thread=False: (~pid << 3) | (4 if thread else 0) | 2  # noqa: E731
    for name in ("clock_gettime", "clock_getres", "clock_nanosleep", "timer_create"):
        for clock in (*range(12), cpu(0), cpu(0, True), cpu(4242, True), -8, -1):
            assert _verdict(c, name, clock) == ALLOW, (name, clock)
        for clock in (12, 64, cpu(1), cpu(4242), (~3 << 3) | 3, (1 << 32) | cpu(1)):  # another pid's; a CLOCKFD
            assert _verdict(c, name, clock) == DEFAULT, (name, clock)


def test_pins_with_every_right_need_fewer_checks() -> None:
    full = int(R.all())
    compiled = _seccomp.compile_filter(fd_rules=((5, full), (6, full)))
    code = _seccomp.instantiate(compiled, 1, DEFAULT)
    for name in ("lseek", "pread64", "fstat", "ftruncate", "getdents64", "dup"):
        action, loaded = _emulate(code, NUMBERS[name], (5,))
        assert action == ALLOW and not loaded, name


def test_emulated_verdicts() -> None:
    c = _seccomp.compile_filter(fd_rules=((5, int(R.READ)), (7, int(R.READ | R.WRITE | R.SEEK | R.FSYNC | R.MMAP_R))))
    assert _verdict(c, "close", 5) == DEFAULT
    assert _verdict(c, "close", (1 << 32) | 5) == DEFAULT
    assert _verdict(c, "close", 6) == ALLOW
    assert _verdict(c, "dup2", 6, 7) == DEFAULT
    assert _verdict(c, "dup2", 7, 9) == DEFAULT  # 7 is writable and lacks FSTAT, FTRUNCATE: no duplicate
    assert _verdict(c, "lseek", 5, 0, 0) == DEFAULT
    assert _verdict(c, "lseek", 7, 0, 0) == ALLOW
    assert _verdict(c, "lseek", 9, 0, 0) == ALLOW
    assert _verdict(c, "fsync", 7) == ALLOW
    assert _verdict(c, "fsync", 5) == DEFAULT
    assert _verdict(c, "fsync", 9) == DEFAULT
    assert _verdict(c, "fallocate", 9, 0, 0, 8192) == ALLOW  # plain preallocation on an unpinned fd
    assert _verdict(c, "fallocate", 9, FALLOC_FL_KEEP_SIZE, 0, 8192) == DEFAULT  # past RLIMIT_FSIZE
    assert _verdict(c, "fallocate", 9, (1 << 32) | FALLOC_FL_KEEP_SIZE, 0, 8192) == DEFAULT  # mode is an int
    assert _verdict(c, "fallocate", 7, 0, 0, 8192) == DEFAULT  # pinned without FTRUNCATE
    assert _verdict(_seccomp.compile_filter(), "fallocate", 9, FALLOC_FL_KEEP_SIZE, 0, 8192) == DEFAULT
    assert _verdict(c, "mmap", 0, 4096, PROT_READ, MAP_SHARED | 0x20, 0xFFFFFFFF, 0) == ALLOW
    assert _verdict(c, "mmap", 0, 4096, PROT_READ, MAP_SHARED, 7, 0) == ALLOW
    assert _verdict(c, "mmap", 0, 4096, PROT_READ, MAP_SHARED, (1 << 32) | 7, 0) == ALLOW  # fget: low word
    assert _verdict(c, "mmap", 0, 4096, PROT_READ, MAP_SHARED, 5, 0) == DEFAULT
    assert _verdict(c, "mmap", 0, 4096, PROT_WRITE, MAP_SHARED, 7, 0) == ALLOW  # MMAP_R + WRITE = MMAP_W
    assert _verdict(c, "mmap", 0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, 7, 0) == DEFAULT
    for first, last, want in [(0, 4, ALLOW), (0, 5, DEFAULT), (6, 6, ALLOW), (6, 7, DEFAULT), (8, 2**32 - 1, ALLOW),
                              (5, 5, DEFAULT), (7, 3, ALLOW), (0, 2**32 - 1, DEFAULT)]:
        assert _verdict(c, "close_range", first, last, 0) == want, (first, last)


# Reference semantics for the differential test below: the plan, evaluated in Python.

def _holds(rule: Rule, args: Sequence[int]) -> bool:
    if rule is None:
        return True

    def test(c: Cond) -> bool:
        word = (args[c.arg] >> 32 if c.hi else args[c.arg]) & 0xFFFFFFFF
        v, want = word & c.mask, 4242 if c.value == PID else c.value  # the pid instantiate() patches in
        return {"eq": v == want, "ne": v != want, "lt": v < want}[c.op]

    return any(all(test(c) for c in alt) for alt in rule)


def _reference(plan: Any, args: Sequence[int]) -> bool:
    lo = [a & 0xFFFFFFFF for a in args]
    for arg, tests in plan.guards:
        for fd, rule in tests:
            if lo[arg] == fd and not _holds(rule, args):
                return False
    if plan.range_pins and lo[0] <= lo[1] and any(lo[0] <= p <= lo[1] for p in plan.range_pins):
        return False
    if plan.pins is not None:
        arg, pins = plan.pins
        for fd, rule in pins:
            if lo[arg] == fd:
                return _holds(rule, args)
    return _holds(plan.base, args) if plan.base != [] else False


def test_compiled_bpf_matches_the_plans() -> None:
    """Differential test of the emitter: random pins, random arguments built from the interesting values."""
    rng = random.Random(7)
    for round_ in range(6):
        groups = tuple(rng.sample(sorted(GROUPS), rng.randint(0, 3)))
        dangerous = ("allow-exec-mappings",) if round_ % 2 else ()
        pins = _mixed_pins(rng.randint(1, 40), seed=round_)
        plans = _seccomp._plans(_seccomp.collect_rules(groups, dangerous), groups, dangerous, pins)
        code = _seccomp.instantiate(_seccomp.compile_filter(groups, dangerous, pins), 4242, DEFAULT)
        fds = [fd for fd, _ in pins]
        values = [*fds, *(fd + 1 for fd in fds), 0, 1, 2, 0x20, 0x21, 0x22, 3, 4, 5, 6, 7, 0x400, 0x404,
                  TIOCSTI, TIOCLINUX, 0x5401, 1030, 0xFFFFFFFF, 4242]
        for name, plan in plans.items():
            for _ in range(60):
                args = [rng.choice(values) | (rng.choice([0, 0, 1, 0xDEAD]) << 32) for _ in range(6)]
                want = ALLOW if _reference(plan, args) else DEFAULT
                assert _emulate(code, NUMBERS[name], args)[0] == want, (name, args, plan)


def test_dup_safe() -> None:
    assert dup_safe(int(R.READ | R.SEEK | R.FSTAT), ())
    assert not dup_safe(int(R.READ | R.FSTAT), ())
    assert not dup_safe(int(R.READ | R.WRITE | R.SEEK | R.FSTAT), ())  # writable: needs FTRUNCATE
    assert dup_safe(int(R.WRITE | R.SEEK | R.FSTAT | R.FTRUNCATE), ())  # writable: no directory, READ moot
    assert not dup_safe(int(R.READ | R.SEEK | R.FSTAT), ("@fd-metadata",))
    assert dup_safe(int(R.READ | R.SEEK | R.FSTAT | R.FLOCK), ("@flock",))


def test_rules_cover_the_pinned_syscalls() -> None:
    assert set(GROUPS_WEAKEN) == set(GROUPS)
    for name in ("lseek", "pread64", "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2"):
        assert PINNED_NEEDS[name] == (0, R.SEEK)
    for name in ("fsync", "fdatasync", "sync_file_range"):
        assert PINNED_NEEDS[name] == (0, R.FSYNC)
    plain = _seccomp.compile_filter()
    assert not {"fsync", "fdatasync", "sync_file_range", "fstatfs"} & plain.allowed


# ------------------------------------------------------------ the spec ----

def test_spec_fd_rules_wire_round_trip_and_strictness() -> None:
    spec = SandboxSpec(fd_rules=((9, int(R.READ | R.SEEK)), (4, R.WRITE | R.APPEND)))
    assert spec.fd_rules == ((4, int(R.WRITE | R.APPEND)), (9, int(R.READ | R.SEEK)))  # sorted plain ints
    assert SandboxSpec.from_wire(spec.to_wire()) == spec
    assert hash(SandboxSpec.from_wire(spec.to_wire())) == hash(spec)
    for bad in [((3, 1), (3, 2)), ((-1, 1),), ((1 << 20, 1),), ((True, 1),), ((3, 1 << 62),), ((3, -1),),
                ((3, True),), ((3,),), (("3", 1),), tuple((i, 1) for i in range(65))]:
        with pytest.raises(SandboxError):
            SandboxSpec(fd_rules=bad)  # type: ignore[arg-type]
    for wire_bad in [[[3, "x"]], [[3]], "x", [[3, 1]] * 65, [[3, 1.0]]]:
        w = spec.to_wire()
        w["fd_rules"] = wire_bad
        with pytest.raises(ProtocolError):
            SandboxSpec.from_wire(w)
    w = spec.to_wire()
    w["fd_rules"] = [[3, 1], [3, 1]]
    with pytest.raises(SandboxError):
        SandboxSpec.from_wire(w)
    w = spec.to_wire()
    del w["fd_rules"]
    with pytest.raises(ProtocolError):
        SandboxSpec.from_wire(w)


def test_compile_with_32_pins_is_fast() -> None:
    pins = _mixed_pins(32)
    t0 = time.perf_counter()
    compiled = _seccomp.compile_filter((), (), pins)
    elapsed = time.perf_counter() - t0
    assert compiled.length < 1500
    assert elapsed < 0.25, elapsed  # once per spec, before fork; prepare() caches it


def test_prepare_compiles_the_pins() -> None:
    spec = SandboxSpec(fd_rules=((5, int(R.READ)),))
    p = prepare(spec)
    assert p is prepare(spec)
    assert p.compiled == _seccomp.compile_filter(spec.effective_groups(), spec.dangerous, spec.fd_rules)


def test_assembler_long_block_uses_ja() -> None:
    """A block longer than an 8-bit jump: compile_filter's header jumps past it with JA; splice keeps labels."""
    body = _bpf.Asm()
    body.ld(_bpf.arg_lo(0))
    body.jump(_bpf.JEQ_K, 7, None, "go")
    body.ret(DEFAULT)
    body.label("go")
    for _ in range(300):
        body.ld(_bpf.arg_lo(1))
    body.ret(ALLOW)
    asm = _bpf.Asm()
    asm.ld(_bpf.OFF_NR)
    asm.jump(_bpf.JEQ_K, 3, "b_start", None)
    asm.ja("b_after")
    asm.label("b_start")
    asm.splice(body, "b_")
    asm.label("b_after")
    asm.ret(0x7)
    code, _ = asm.assemble()
    assert _emulate(code, 3, (7,))[0] == DEFAULT
    assert _emulate(code, 3, (8,))[0] == ALLOW
    assert _emulate(code, 4, (7,))[0] == 0x7
    asm.jump(_bpf.JEQ_K, 1, "b_start", None)  # backwards
    with pytest.raises(ValueError, match="out of range"):
        asm.assemble()
    far = _bpf.Asm()
    far.jump(_bpf.JEQ_K, 1, "end", None)
    for _ in range(256):
        far.ld(0)
    far.label("end")
    with pytest.raises(ValueError, match="out of range"):  # never wraps around
        far.assemble()
