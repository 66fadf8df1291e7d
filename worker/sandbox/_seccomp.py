"""The seccomp layer: compile the allowlist to BPF (in the parent, once per
spec) and load it (in the child). Private.

Layout of the emitted program, chosen so the kernel's action cache keeps every
unconditionally allowed syscall out of BPF altogether (KERNEL-FACTS §3.6):

1. arch != x86_64 (i386 ``int 0x80``, anything else) -> KILL_PROCESS
2. nr >= 0x40000000 (x32) -> default action
3. argument-checked syscalls, hottest first; each a self-contained block that
   ends in ALLOW or the default action, and only its own nr(s) ever enter it
   (syscalls with identical tests share one block). With pinned fds
   (``fd_rules``) a block starts with its per-fd prefix: for each pinned
   number whose rights change the outcome, ``ld fd; jeq N -> N's rule``
   (deny, allow, or an argument test), then the rule for every other fd.
   close_range is tested against each pinned number; syscalls no pin
   concerns stay unconditional.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import _bpf
from ._libc import ffi, lib
from ._seccomp_rules import (
    BASE,
    DANGEROUS,
    ERRNO,
    GROUPS,
    GUARDED,
    LOOPBACK_SYSCALLS,
    PID,
    PIN_ARG,
    Cond,
    Rule,
    dup_safe,
    normalize,
    pinned_guards,
    pinned_rule,
)
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
_HOT_ORDER = ["mmap", "newfstatat", "fcntl", "ioctl", "mprotect", "madvise", "futex", "statx", "openat",
              # checked only when fds are pinned
              "close", "pread64", "lseek", "fstat", "pwrite64", "getdents64", "dup", "dup2", "dup3"]


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


# A rule in hashable form, to find syscalls whose blocks are the same code.
_Key = tuple[tuple[Cond, ...], ...] | None
_Chain = tuple[int, tuple[tuple[int, Rule], ...]]  # (fd argument, ((pinned fd, rule), ...)), fds ascending


def _key(rule: Rule) -> _Key:
    return None if rule is None else tuple(tuple(alt) for alt in rule)


@dataclass(frozen=True)
class _Plan:
    """Everything one syscall's block tests, in order: guards (a pinned fd in a secondary argument must
    pass its rule, else deny), close_range's pinned numbers, the pinned fds of the main fd argument (each
    with the rule replacing ``base`` for it), then ``base`` for every other fd. ``[]`` denies."""

    base: Rule
    guards: tuple[_Chain, ...] = ()
    range_pins: tuple[int, ...] = ()
    pins: _Chain | None = None

    @property
    def unconditional(self) -> bool:
        return self.base is None and not self.guards and not self.range_pins and self.pins is None

    @property
    def allows_something(self) -> bool:
        if self.base != []:
            return True
        return self.pins is not None and any(rule != [] for _, rule in self.pins[1])

    def key(self) -> tuple[object, ...]:
        def chain(c: _Chain | None) -> object:
            return None if c is None else (c[0], tuple((fd, _key(r)) for fd, r in c[1]))

        return (_key(self.base), tuple(chain(g) for g in self.guards), self.range_pins, chain(self.pins))


def _plans(rules: dict[str, Rule], groups: tuple[str, ...], dangerous: tuple[str, ...],
           fd_rules: tuple[tuple[int, int], ...]) -> dict[str, _Plan]:
    """Per-syscall plans; with no pinned fd, just the collected rules."""
    base: dict[str, Rule] = {name: normalize(rule) for name, rule in rules.items()}
    if not fd_rules:
        return {name: _Plan(rule) for name, rule in base.items()}
    pinned = sorted(fd_rules)
    if not all(dup_safe(r, groups) for _, r in pinned):
        for name in LOOPBACK_SYSCALLS:  # no SCM_RIGHTS loop back to ourselves: it would dup a pinned fd
            base.pop(name, None)
    exec_mappings = "allow-exec-mappings" in dangerous
    plans = {name: _Plan(rule) for name, rule in base.items()}
    for name in sorted(set(PIN_ARG) | GUARDED | {"close_range"}):
        rule = base.get(name, [])
        guards: dict[int, list[tuple[int, Rule]]] = {}
        for fd, rights in pinned:
            for arg, test in pinned_guards(name, rights):
                guards.setdefault(arg, []).append((fd, test))
        pins: _Chain | None = None
        if name in PIN_ARG:
            differ = []
            for fd, rights in pinned:
                pin_rule = normalize(pinned_rule(name, rights, rule, groups=groups, exec_mappings=exec_mappings))
                if _key(pin_rule) != _key(rule):
                    differ.append((fd, pin_rule))
            pins = (PIN_ARG[name], tuple(differ)) if differ else None
        plan = _Plan(rule, tuple((arg, tuple(tests)) for arg, tests in sorted(guards.items())),
                     tuple(fd for fd, _ in pinned) if name == "close_range" else (), pins)
        if plan.allows_something:
            plans[name] = plan
        else:
            plans.pop(name, None)
    return plans


class _Block:
    """Emits one plan as a self-contained piece of BPF (labels local; spliced in by compile_filter)."""

    def __init__(self) -> None:
        self.asm = _bpf.Asm()
        self._n = 0

    def _fresh(self) -> str:
        self._n += 1
        return f"l{self._n}"

    def alts(self, alts: list[list[Cond]], ok: str, fail: str, a_holds: int | None = None) -> None:
        """Jump to ``ok`` if some alternative holds, else to ``fail``. ``a_holds``: the offset already
        loaded in A on entry, if known."""
        asm = self.asm
        for j, alt in enumerate(alts):
            nxt = self._fresh() if j + 1 < len(alts) else fail
            for t, cond in enumerate(alt):
                last = t + 1 == len(alt)
                off = _bpf.arg_hi(cond.arg) if cond.hi else _bpf.arg_lo(cond.arg)
                if a_holds != off or t:
                    asm.ld(off)
                if cond.mask != 0xFFFFFFFF:
                    asm.and_(cond.mask)
                mark = "pid" if cond.value == PID else None
                value = 0 if cond.value == PID else cond.value
                if cond.op == "eq":
                    asm.jump(_bpf.JEQ_K, value, ok if last else None, nxt, mark)
                elif cond.op == "ne":
                    asm.jump(_bpf.JEQ_K, value, nxt, ok if last else None, mark)
                elif cond.op == "lt":
                    asm.jump(_bpf.JGE_K, value, nxt, ok if last else None, mark)
                else:
                    raise ValueError(f"unknown op {cond.op}")
            if j + 1 < len(alts):
                asm.label(nxt)
            # a failed single full-word test leaves A as it was: the next alternative may reuse it
            single = len(alt) == 1 and alt[0].mask == 0xFFFFFFFF
            a_holds = (_bpf.arg_hi(alt[0].arg) if alt[0].hi else _bpf.arg_lo(alt[0].arg)) if single else None

    def chain(self, chain: _Chain, on_pass: str, nxt: str) -> None:
        """For each pinned fd in the chain's argument: jump to its rule, which goes to ``on_pass`` or
        "deny". Any other fd goes on to ``nxt``, placed right after."""
        arg, pins = chain
        asm = self.asm
        targets: dict[_Key, str] = {}
        bodies: list[tuple[str, list[list[Cond]]]] = []
        jump_to = []
        for _, rule in pins:
            if rule is None:
                jump_to.append(on_pass)
            elif not rule:
                jump_to.append("deny")
            else:
                k = _key(rule)
                if k not in targets:
                    targets[k] = self._fresh()
                    bodies.append((targets[k], rule))
                jump_to.append(targets[k])
        asm.ld(_bpf.arg_lo(arg))
        for i, ((fd, _), tgt) in enumerate(zip(pins, jump_to, strict=True)):
            asm.jump(_bpf.JEQ_K, fd, tgt, nxt if i + 1 == len(pins) and bodies else None)
        for label, rule in bodies:
            asm.label(label)
            self.alts(rule, on_pass, "deny", a_holds=_bpf.arg_lo(arg))
        asm.label(nxt)

    def close_range(self, pins: tuple[int, ...], nxt: str) -> None:
        """Deny when first <= p <= last for a pinned p (unsigned int arguments). Find the smallest p >=
        first with a run of JGTs; the range covers a pin iff it covers that one."""
        asm = self.asm
        checks = [self._fresh() for _ in pins]
        asm.ld(_bpf.arg_lo(0))
        for i, p in enumerate(pins):
            asm.jump(_bpf.JGT_K, p, nxt if i + 1 == len(pins) else None, checks[i])
        for label, p in zip(checks, pins, strict=True):
            asm.label(label)
            asm.ld(_bpf.arg_lo(1))
            asm.jump(_bpf.JGE_K, p, "deny", nxt)
        asm.label(nxt)

    def plan(self, plan: _Plan) -> _bpf.Asm:
        for guard in plan.guards:
            nxt = self._fresh()
            self.chain(guard, nxt, nxt)  # passing a guard goes on to the next test
        if plan.range_pins:
            self.close_range(plan.range_pins, self._fresh())
        if plan.pins is not None:
            self.chain(plan.pins, "allow", self._fresh())
        asm = self.asm
        if plan.base is None:
            asm.label("allow")
            asm.ret(RET_ALLOW)
            asm.label("deny")
            asm.ret(0, mark="default")
        else:
            if plan.base:
                self.alts(plan.base, "allow", "deny")
            asm.label("deny")
            asm.ret(0, mark="default")
            asm.label("allow")
            asm.ret(RET_ALLOW)
        return asm


def _order(name: str) -> tuple[int, int]:
    return (_HOT_ORDER.index(name) if name in _HOT_ORDER else len(_HOT_ORDER), NUMBERS[name])


# What the dispatch tree does for one syscall number: ("ret", action), ("ja", block label), or
# ("default",) for numbers nothing allows. A segment's leaf may also be ("eqs", ((nr, leaf), ...)):
# a few lone numbers tested one by one, everything else in the segment default.
_Leaf = tuple[Any, ...]
_DEFAULT: _Leaf = ("default",)
_EQS_MAX = 3


def _segments(leaf: dict[int, _Leaf]) -> list[tuple[int, _Leaf]]:
    """Partition [0, X32_SYSCALL_BIT) into runs of numbers with the same leaf: (first number, leaf).
    Lone numbers between default runs are folded into their neighbours as "eqs" segments: a JEQ
    costs one instruction where a tree node and two more leaves cost three."""
    segs: list[tuple[int, _Leaf]] = [(0, leaf.get(0, _DEFAULT))]
    for nr in sorted({n for n in leaf} | {n + 1 for n in leaf}):
        if 0 < nr < X32_SYSCALL_BIT and leaf.get(nr, _DEFAULT) != segs[-1][1]:
            segs.append((nr, leaf.get(nr, _DEFAULT)))
    out: list[tuple[int, _Leaf]] = []
    i = 0
    while i < len(segs):
        lone: list[tuple[int, _Leaf]] = []
        j = i
        while (segs[j][1] == _DEFAULT and j + 2 < len(segs) and segs[j + 2][1] == _DEFAULT
               and segs[j + 2][0] == segs[j + 1][0] + 1 and len(lone) < _EQS_MAX):
            lone.append(segs[j + 1])
            j += 2
        if lone:
            out.append((segs[i][0], ("eqs", tuple(lone))))
            i = j + 1
        else:
            out.append(segs[i])
            i += 1
    return out


def _leaf_size(leaf: _Leaf) -> int:
    return 2 * len(leaf[1]) + 1 if leaf[0] == "eqs" else 1


def _tree_size(segs: list[tuple[int, _Leaf]]) -> int:
    """Instructions _dispatch emits for these segments."""
    if len(segs) == 1:
        return _leaf_size(segs[0][1])
    mid = len(segs) // 2
    left = _tree_size(segs[:mid])
    return 1 + (left > 255) + left + _tree_size(segs[mid:])


def _emit_leaf(asm: _bpf.Asm, leaf: _Leaf) -> None:
    if leaf[0] == "ja":
        asm.ja(leaf[1])
    elif leaf[0] == "ret":
        asm.ret(leaf[1])
    elif leaf[0] == "eqs":
        for nr, inner in leaf[1]:
            asm.jump(_bpf.JEQ_K, nr, None, f"ne{nr}")
            _emit_leaf(asm, inner)
            asm.label(f"ne{nr}")
        asm.ret(0, mark="default")
    else:
        asm.ret(0, mark="default")


def _dispatch(asm: _bpf.Asm, segs: list[tuple[int, _Leaf]], ids: Iterator[int]) -> None:
    """A balanced binary search on the syscall number (in A): a handful of compares for every
    syscall, so the kernel's per-syscall cache emulation at load and each checked call walk a few
    instructions, not the whole allowlist."""
    if len(segs) == 1:
        _emit_leaf(asm, segs[0][1])
        return
    mid = len(segs) // 2
    right, left = f"t{next(ids)}", f"t{next(ids)}"
    if _tree_size(segs[:mid]) <= 255:
        asm.jump(_bpf.JGE_K, segs[mid][0], right, None)
    else:  # too far for an 8-bit offset: JA carries 32 bits
        asm.jump(_bpf.JGE_K, segs[mid][0], None, left)
        asm.ja(right)
        asm.label(left)
    _dispatch(asm, segs[:mid], ids)
    asm.label(right)
    _dispatch(asm, segs[mid:], ids)


def compile_filter(groups: Iterable[str] = (), dangerous: Iterable[str] = (),
                   fd_rules: Iterable[tuple[int, int]] = ()) -> Compiled:
    """Compile the allowlist. ``fd_rules``: (fd held at entry, protocol.Rights) pinned by number; with
    none, no per-fd test is emitted at all."""
    groups, dangerous = tuple(groups), tuple(dangerous)
    plans = _plans(collect_rules(groups, dangerous), groups, dangerous, tuple(fd_rules))
    asm = _bpf.Asm()
    asm.ld(_bpf.OFF_ARCH)
    asm.jump(_bpf.JEQ_K, AUDIT_ARCH_X86_64, "arch_ok", None)
    asm.ret(RET_KILL_PROCESS)
    asm.label("arch_ok")
    asm.ld(_bpf.OFF_NR)
    asm.jump(_bpf.JGE_K, X32_SYSCALL_BIT, None, "native")
    asm.ret(0, mark="default")
    asm.label("native")
    # Syscalls with the same plan share one block (kill/tkill/tgkill..., the SEEK family).
    shared: dict[tuple[object, ...], list[str]] = {}
    for name, plan in plans.items():
        if not plan.unconditional:
            shared.setdefault(plan.key(), []).append(name)
    blocks = sorted((sorted(ns, key=_order) for ns in shared.values()), key=lambda ns: _order(ns[0]))
    leaf: dict[int, _Leaf] = {}
    for b, names in enumerate(blocks):
        for name in names:
            leaf[NUMBERS[name]] = ("ja", f"b{b}_start")
    for name, err in ERRNO.items():
        leaf.setdefault(NUMBERS[name], ("ret", RET_ERRNO | err))
    for name, plan in plans.items():
        if plan.unconditional:  # a checked block or a fixed errno takes precedence, as it always has
            leaf.setdefault(NUMBERS[name], ("ret", RET_ALLOW))
    _dispatch(asm, _segments(leaf), iter(range(1 << 30)))
    for b, names in enumerate(blocks):
        asm.label(f"b{b}_start")
        asm.splice(_Block().plan(plans[names[0]]), f"b{b}_")
    code, marks = asm.assemble()
    if len(code) // 8 > 4096:
        raise ValueError("seccomp filter longer than BPF_MAXINSNS")
    return Compiled(code, tuple(marks.get("pid", ())), tuple(marks.get("default", ())), frozenset(plans))


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
