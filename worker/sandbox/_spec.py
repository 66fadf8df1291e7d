"""What a worker's sandbox must be: plain, frozen, wire-safe settings.

(Shared by the broker's Policy and the sandbox entry code; extend here.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from protocol import SandboxError

VIOLATION_MODES = ("kill", "errno")


@dataclass(frozen=True)
class Limits:
    """Resource limits applied at sandbox entry (``None`` leaves one as is)."""

    address_space: int | None = 4 << 30  # RLIMIT_AS, bytes
    open_files: int | None = 256  # RLIMIT_NOFILE
    processes: int | None = 64  # RLIMIT_NPROC (bites only for non-root / inside a user namespace)
    file_size: int | None = 1 << 30  # RLIMIT_FSIZE, bytes
    cpu_seconds: int | None = None  # RLIMIT_CPU

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise SandboxError(f"limit {f.name} must be a non-negative int or None, not {v!r}")


@dataclass(frozen=True)
class SandboxSpec:
    """Every setting of the sandbox a worker enters after ``setup()``."""

    landlock: bool = True
    landlock_min_abi: int = 0
    seccomp: bool = True
    violation: str = "kill"
    syscall_groups: tuple[str, ...] = ()
    dangerous: tuple[str, ...] = ()
    namespaces: bool = True
    limits: Limits = field(default_factory=Limits)
    fs_rules: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.violation not in VIOLATION_MODES:
            raise SandboxError(f"violation must be one of {VIOLATION_MODES}, not {self.violation!r}")
        if not isinstance(self.landlock_min_abi, int) or not 0 <= self.landlock_min_abi <= 64:
            raise SandboxError("landlock_min_abi must be a small non-negative int")
        for name in ("syscall_groups", "dangerous"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(x, str) for x in value):
                raise SandboxError(f"{name} must be a tuple of names")

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["syscall_groups"] = list(self.syscall_groups)
        d["dangerous"] = list(self.dangerous)
        d["fs_rules"] = [list(r) for r in self.fs_rules]
        return d

    @classmethod
    def from_wire(cls, d: object) -> SandboxSpec:
        if not isinstance(d, dict) or set(d) != {f.name for f in fields(cls)}:
            raise SandboxError("malformed sandbox spec")
        try:
            limits = d["limits"]
            if not isinstance(limits, dict):
                raise SandboxError("malformed limits")
            return cls(
                landlock=bool(d["landlock"]),
                landlock_min_abi=d["landlock_min_abi"],
                seccomp=bool(d["seccomp"]),
                violation=d["violation"],
                syscall_groups=tuple(d["syscall_groups"]),
                dangerous=tuple(d["dangerous"]),
                namespaces=bool(d["namespaces"]),
                limits=Limits(**limits),
                fs_rules=tuple((int(a), int(b)) for a, b in d["fs_rules"]),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise SandboxError(f"malformed sandbox spec: {exc}") from exc
