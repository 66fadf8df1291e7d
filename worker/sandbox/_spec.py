"""SandboxSpec and Limits: the sandbox a worker enters, as a value. Private;
re-exported by ``worker.sandbox``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from protocol import ProtocolError, SandboxError
from protocol._rights import rights_from_wire

from ._seccomp_rules import DANGEROUS, GROUPS, GROUPS_NEED_LANDLOCK

VIOLATION_MODES = ("kill", "errno")
_MAX_FD = 1 << 20
_MAX_RULES = 64
_MAX_PINS = 64  # keeps the filter well under BPF_MAXINSNS and every per-fd jump within 8 bits
_INT64 = (1 << 63) - 1


@dataclass(frozen=True)
class Limits:
    """Resource limits (soft = hard; only ever lowered). None leaves one alone.

    ``processes`` (RLIMIT_NPROC) counts threads too, per real uid: a worker
    of a root broker has a real uid of its own, so it binds each such worker
    alone; a non-root broker's workers share its uid and count together with
    all of that user's processes. Core dumps are always off.

    ``memory`` is not an rlimit: it caps the memory a worker's pages are
    charged (RSS, page cache, kernel memory) with a cgroup of its own, which
    the broker makes where it can (cgroup v2, or v1's memory controller; see
    ``Broker.cgroups``). Where it cannot, the worker starts with the rlimits
    only and its report says why (``cgroup``).
    """

    address_space: int | None = 4 << 30
    open_files: int | None = 256
    processes: int | None = 64
    file_size: int | None = 1 << 30
    cpu_seconds: int | None = None
    memory: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _INT64):
                raise SandboxError(f"Limits.{f.name} must be a non-negative int or None, not {v!r}")


@dataclass(frozen=True)
class SandboxSpec:
    """What a worker gives up at entry. See ``worker.sandbox`` for each field.

    ``syscall_groups`` names extra allowlist groups (``@fs-at``,
    ``@fd-metadata``, ``@splice``, ``@memlock``, ``@sched``, ``@flock``);
    ``dangerous`` names options that loosen what is otherwise always denied
    (``allow-exec-mappings``, ``allow-fork``). ``@fs-at`` is implied when
    ``fs_rules`` is non-empty and Landlock is on, since path walks beneath a
    directory grant are then confined by Landlock.

    ``fd_rules`` pins rights to fd numbers: ``(fd, protocol.Rights)`` for
    every grant held at entry (files and directories). The seccomp filter
    then allows the rights' syscalls on that number only as the rights say,
    and never lets the slot be closed or replaced. Every pinned fd must be
    among the fds kept at entry.
    """

    landlock: bool = True
    landlock_min_abi: int = 0
    seccomp: bool = True
    violation: str = "kill"
    syscall_groups: tuple[str, ...] = ()
    dangerous: tuple[str, ...] = ()
    namespaces: bool = True
    limits: Limits = field(default_factory=Limits)
    fs_rules: tuple[tuple[int, int], ...] = ()
    fd_rules: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("landlock", "seccomp", "namespaces"):
            if not isinstance(getattr(self, name), bool):
                raise SandboxError(f"SandboxSpec.{name} must be a bool")
        if not isinstance(self.landlock_min_abi, int) or isinstance(self.landlock_min_abi, bool) \
                or not 0 <= self.landlock_min_abi <= 64:
            raise SandboxError("landlock_min_abi must be an int in 0..64")
        if self.landlock_min_abi and not self.landlock:
            raise SandboxError("landlock_min_abi needs landlock=True")
        if self.violation not in VIOLATION_MODES:
            raise SandboxError(f"violation must be 'kill' or 'errno', not {self.violation!r}")
        object.__setattr__(self, "syscall_groups", tuple(self.syscall_groups))
        object.__setattr__(self, "dangerous", tuple(self.dangerous))
        object.__setattr__(self, "fs_rules", tuple((int(fd), int(r)) for fd, r in self.fs_rules))
        for g in self.syscall_groups:
            if g not in GROUPS:
                raise SandboxError(f"unknown syscall group {g!r}; known: {sorted(GROUPS)}")
            if g in GROUPS_NEED_LANDLOCK and not self.landlock:
                raise SandboxError(f"syscall group {g} is only safe with Landlock on")
        for d in self.dangerous:
            if d not in DANGEROUS:
                raise SandboxError(f"unknown dangerous option {d!r}; known: {sorted(DANGEROUS)}")
        if not isinstance(self.limits, Limits):
            raise SandboxError("limits must be a Limits")
        if len(self.fs_rules) > _MAX_RULES:
            raise SandboxError(f"more than {_MAX_RULES} fs rules")
        for fd, rights in self.fs_rules:
            if not 0 <= fd < _MAX_FD:
                raise SandboxError(f"fs rule fd {fd} out of range")
            try:
                rights_from_wire(rights)
            except ProtocolError as exc:
                raise SandboxError(str(exc)) from None
        self._check_fd_rules()

    def _check_fd_rules(self) -> None:
        try:
            pins = tuple((fd, rights) for fd, rights in self.fd_rules)
        except (TypeError, ValueError):
            raise SandboxError("fd_rules must be (fd, rights) pairs") from None
        if len(pins) > _MAX_PINS:
            raise SandboxError(f"more than {_MAX_PINS} pinned fds")
        for fd, rights in pins:
            if not isinstance(fd, int) or isinstance(fd, bool) or not 0 <= fd < _MAX_FD:
                raise SandboxError(f"pinned fd {fd!r} out of range")
            if not isinstance(rights, int) or isinstance(rights, bool):
                raise SandboxError(f"pinned fd {fd}: rights must be protocol.Rights or int, not {rights!r}")
            try:
                rights_from_wire(int(rights))  # unknown bits refused
            except ProtocolError as exc:
                raise SandboxError(f"pinned fd {fd}: {exc}") from None
        fds = [fd for fd, _ in pins]
        if len(set(fds)) != len(fds):
            raise SandboxError("fd_rules name the same fd twice")
        # sorted and plain ints: equal specs compare and hash equal (prepare() caches by spec)
        object.__setattr__(self, "fd_rules", tuple(sorted((int(fd), int(r)) for fd, r in pins)))

    def effective_groups(self) -> tuple[str, ...]:
        groups = list(dict.fromkeys(self.syscall_groups))
        if self.fs_rules and self.landlock and "@fs-at" not in groups:
            groups.append("@fs-at")
        return tuple(sorted(groups))

    def to_wire(self) -> dict[str, Any]:
        return {
            "landlock": self.landlock,
            "landlock_min_abi": self.landlock_min_abi,
            "seccomp": self.seccomp,
            "violation": self.violation,
            "syscall_groups": list(self.syscall_groups),
            "dangerous": list(self.dangerous),
            "namespaces": self.namespaces,
            "limits": {f.name: getattr(self.limits, f.name) for f in fields(Limits)},
            "fs_rules": [[fd, rights] for fd, rights in self.fs_rules],
            "fd_rules": [[fd, rights] for fd, rights in self.fd_rules],
        }

    @classmethod
    def from_wire(cls, d: object) -> SandboxSpec:
        """Strictly validate peer data: exact keys and types, bounded sizes."""
        if not isinstance(d, dict) or set(d) != {f.name for f in fields(cls)}:
            raise ProtocolError("sandbox spec: wrong shape or keys")
        lim = d["limits"]
        if not isinstance(lim, dict) or set(lim) != {f.name for f in fields(Limits)}:
            raise ProtocolError("sandbox spec: bad limits")
        for v in lim.values():
            if v is not None and (type(v) is not int):
                raise ProtocolError("sandbox spec: limit values must be int or None")
        for key in ("syscall_groups", "dangerous"):
            val = d[key]
            if not isinstance(val, list) or len(val) > 32 or not all(type(x) is str for x in val):
                raise ProtocolError(f"sandbox spec: {key} must be a short list of str")
        rules = d["fs_rules"]
        if not isinstance(rules, list) or len(rules) > _MAX_RULES:
            raise ProtocolError("sandbox spec: fs_rules must be a list")
        for r in rules:
            if not isinstance(r, list | tuple) or len(r) != 2 or not all(type(x) is int for x in r):
                raise ProtocolError("sandbox spec: each fs rule is [fd, rights]")
        pins = d["fd_rules"]
        if not isinstance(pins, list) or len(pins) > _MAX_PINS:
            raise ProtocolError("sandbox spec: fd_rules must be a short list")
        for r in pins:
            if not isinstance(r, list | tuple) or len(r) != 2 or not all(type(x) is int for x in r):
                raise ProtocolError("sandbox spec: each fd rule is [fd, rights]")
        for key in ("landlock", "seccomp", "namespaces"):
            if type(d[key]) is not bool:
                raise ProtocolError(f"sandbox spec: {key} must be a bool")
        if type(d["landlock_min_abi"]) is not int or type(d["violation"]) is not str:
            raise ProtocolError("sandbox spec: bad landlock_min_abi or violation")
        return cls(
            landlock=d["landlock"],
            landlock_min_abi=d["landlock_min_abi"],
            seccomp=d["seccomp"],
            violation=d["violation"],
            syscall_groups=tuple(d["syscall_groups"]),
            dangerous=tuple(d["dangerous"]),
            namespaces=d["namespaces"],
            limits=Limits(**lim),
            fs_rules=tuple((fd, rights) for fd, rights in rules),
            fd_rules=tuple((fd, rights) for fd, rights in pins),
        )
