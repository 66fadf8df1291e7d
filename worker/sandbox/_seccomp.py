"""The seccomp layer: compile the allowlist to BPF (in the parent, once per
spec) and load it (in the child). Private.

Layout of the emitted program, chosen so the kernel's action cache keeps every
unconditionally allowed syscall out of BPF altogether (KERNEL-FACTS §3.6):

1. arch != x86_64 (i386 ``int 0x80``, anything else) -> KILL_PROCESS
2. nr >= 0x40000000 (x32) -> default action
3. argument-checked syscalls, hottest first; each a self-contained block that
   ends in ALLOW or the default action, and only its own nr ever enters it
4. fixed errnos (clone3 -> ENOSYS)
5. unconditional allows as nr ranges (nr/arch tests only: cacheable)
6. default action

The default action is USER_NOTIF (the broker learns the exact syscall and
arguments, then kills or answers EPERM), or, when no listener is possible,
KILL_PROCESS ("kill") / ERRNO(EPERM) ("errno"). The worker's pid and the
default action are patched into the compiled program at entry, so
:func:`compile_filter` can run before fork.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass

from . import _bpf
from ._libc import ffi, lib
from ._seccomp_rules import BASE, DANGEROUS, ERRNO, GROUPS, PID, Cond, Rule
from ._syscalls import NUMBERS, X32_SYSCALL_BIT

ffi.cdef("struct privsep_sock_fprog { unsigned short len; void *filter; };")

SYS_SECCOMP = 317
SET_MODE_FILTER = 1
GET_ACTION_AVAIL = 2
GET_NOTIF_SIZES = 3
FLAG_TSYNC = 1
FLAG_NEW_LISTENER = 8
FLAG_WAIT_KILLABLE_RECV = 32

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000

AUDIT_ARCH_X86_64 = 0xC000003E

# Hot argument-checked syscalls first: each earlier block costs one JEQ.
_HOT_ORDER = ["mmap", "newfstatat", "fcntl", "ioctl", "mprotect", "madvise", "futex", "statx", "openat"]


@dataclass(frozen=True)
class Compiled:
    code: bytes  # struct sock_filter[] with placeholders
    pid_at: tuple[int, ...]  # instruction indexes whose k is the worker's pid
    default_at: tuple[int, ...]  # instruction indexes whose k is the default action
    allowed: frozenset[str]  # every syscall some path allows (for reports/tests)

    @property
    def length(self) -> int:
        return len(self.code) // 8


def _merge(a: Rule, b: Rule) -> Rule:
    if a is None or b is None:
        return None
    return a + b


def collect_rules(groups: Iterable[str], dangerous: Iterable[str]) -> dict[str, Rule]:
    rules: dict[str, Rule] = dict(BASE)
    sources = [GROUPS[g] for g in groups] + [DANGEROUS[d] for d in dangerous]
    for src in sources:
        for name, rule in src.items():
            rules[name] = _merge(rules[name], rule) if name in rules else rule
    return rules


def _emit_block(asm: _bpf.Asm, name: str, alts: list[list[Cond]]) -> None:
    nr = NUMBERS[name]
    after, deny, allow = f"after_{name}", f"deny_{name}", f"allow_{name}"
    asm.jump(_bpf.JEQ_K, nr, None, after)
    a_holds: int | None = None  # offset A holds on entry to this alternative, if known
    for j, alt in enumerate(alts):
        fail = f"alt_{name}_{j + 1}" if j + 1 < len(alts) else deny
        if j:
            asm.label(f"alt_{name}_{j}")
        for t, cond in enumerate(alt):
            ok = allow if t + 1 == len(alt) else None
            off = _bpf.arg_hi(cond.arg) if cond.hi else _bpf.arg_lo(cond.arg)
            if a_holds != off or t:
                asm.ld(off)
            if cond.mask != 0xFFFFFFFF:
                asm.and_(cond.mask)
            mark = "pid" if cond.value == PID else None
            value = 0 if cond.value == PID else cond.value
            if cond.op == "eq":
                asm.jump(_bpf.JEQ_K, value, ok, fail, mark)
            elif cond.op == "lt":
                asm.jump(_bpf.JGE_K, value, fail, ok, mark)
            else:
                raise ValueError(f"unknown op {cond.op}")
        single = len(alt) == 1 and alt[0].mask == 0xFFFFFFFF
        a_holds = (_bpf.arg_hi(alt[0].arg) if alt[0].hi else _bpf.arg_lo(alt[0].arg)) if single else None
    asm.label(deny)
    asm.ret(0, mark="default")
    asm.label(allow)
    asm.ret(RET_ALLOW)
    asm.label(after)


def _runs(nrs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for nr in sorted(nrs):
        if out and out[-1][1] + 1 == nr:
            out[-1] = (out[-1][0], nr)
        else:
            out.append((nr, nr))
    return out


def compile_filter(groups: Iterable[str] = (), dangerous: Iterable[str] = ()) -> Compiled:
    rules = collect_rules(groups, dangerous)
    asm = _bpf.Asm()
    asm.ld(_bpf.OFF_ARCH)
    asm.jump(_bpf.JEQ_K, AUDIT_ARCH_X86_64, "arch_ok", None)
    asm.ret(RET_KILL_PROCESS)
    asm.label("arch_ok")
    asm.ld(_bpf.OFF_NR)
    asm.jump(_bpf.JGE_K, X32_SYSCALL_BIT, None, "native")
    asm.ret(0, mark="default")
    asm.label("native")
    checked = [n for n, r in rules.items() if r is not None]
    checked.sort(key=lambda n: (_HOT_ORDER.index(n) if n in _HOT_ORDER else len(_HOT_ORDER), NUMBERS[n]))
    for name in checked:
        rule = rules[name]
        assert rule is not None
        _emit_block(asm, name, rule)
    for name, err in sorted(ERRNO.items()):
        asm.jump(_bpf.JEQ_K, NUMBERS[name], None, f"not_{name}")
        asm.ret(RET_ERRNO | err)
        asm.label(f"not_{name}")
    for i, (lo, hi) in enumerate(_runs([NUMBERS[n] for n, r in rules.items() if r is None])):
        nxt = f"run_{i}"
        if lo == hi:
            asm.jump(_bpf.JEQ_K, lo, None, nxt)
        else:
            asm.jump(_bpf.JGE_K, lo, None, nxt)
            asm.jump(_bpf.JGT_K, hi, nxt, None)
        asm.ret(RET_ALLOW)
        asm.label(nxt)
    asm.ret(0, mark="default")
    code, marks = asm.assemble()
    if len(code) // 8 > 4096:
        raise ValueError("seccomp filter longer than BPF_MAXINSNS")
    return Compiled(code, tuple(marks.get("pid", ())), tuple(marks.get("default", ())), frozenset(rules))


def default_action(violation: str, notify: bool) -> int:
    if notify:
        return RET_USER_NOTIF
    return RET_KILL_PROCESS if violation == "kill" else RET_ERRNO | errno.EPERM


def instantiate(compiled: Compiled, pid: int, default: int) -> bytes:
    """The program with this worker's pid and the chosen default action."""
    code = bytearray(compiled.code)
    for i in compiled.pid_at:
        _bpf.patch_k(code, i, pid)
    for i in compiled.default_at:
        _bpf.patch_k(code, i, default)
    return bytes(code)


def load(code: bytes, flags: int) -> int:
    """seccomp(SET_MODE_FILTER, flags, prog). Returns the listener fd when
    ``flags`` has NEW_LISTENER, else 0. Raises OSError."""
    buf = ffi.new("char[]", code)
    prog = ffi.new("struct privsep_sock_fprog *")
    prog.len = len(code) // 8
    prog.filter = buf
    rc = int(lib.syscall(ffi.cast("long", SYS_SECCOMP), ffi.cast("long", SET_MODE_FILTER), ffi.cast("long", flags),
                         prog))
    if rc < 0:
        err = ffi.errno
        raise OSError(err, f"seccomp(SET_MODE_FILTER, {flags:#x}): {errno.errorcode.get(err, err)}")
    return rc


def action_available(action: int) -> bool:
    val = ffi.new("uint32_t *", action)
    rc = int(lib.syscall(ffi.cast("long", SYS_SECCOMP), ffi.cast("long", GET_ACTION_AVAIL), ffi.cast("long", 0), val))
    return rc == 0


def flags_supported(flags: int) -> bool:
    """True if the kernel accepts ``flags`` for SET_MODE_FILTER.

    The kernel validates flags before it copies the program, so a NULL program
    gives EFAULT for known flags and EINVAL otherwise; nothing is installed.
    """
    rc = int(lib.syscall(ffi.cast("long", SYS_SECCOMP), ffi.cast("long", SET_MODE_FILTER), ffi.cast("long", flags),
                         ffi.NULL))
    return rc < 0 and ffi.errno == errno.EFAULT


def notif_sizes() -> tuple[int, int, int] | None:
    sizes = ffi.new("uint16_t[3]")
    rc = int(lib.syscall(ffi.cast("long", SYS_SECCOMP), ffi.cast("long", GET_NOTIF_SIZES), ffi.cast("long", 0), sizes))
    if rc != 0:
        return None
    return int(sizes[0]), int(sizes[1]), int(sizes[2])


def warm() -> None:
    """Build the call interface ``load`` uses: an unknown flag is refused
    (EINVAL) before anything is installed."""
    prog = ffi.new("struct privsep_sock_fprog *")
    ffi.new("char[]", b"\0" * 8)
    lib.syscall(ffi.cast("long", SYS_SECCOMP), ffi.cast("long", SET_MODE_FILTER), ffi.cast("long", 1 << 30), prog)
