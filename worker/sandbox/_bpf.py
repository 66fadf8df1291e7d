"""A tiny classic-BPF assembler for seccomp filters. Private.

Only the instructions the kernel's seccomp action cache can emulate are used
on the nr/arch paths (LD|W|ABS, JEQ/JGE/JSET with K, JA, RET|K), so every
syscall allowed without an argument check is cached and skips BPF entirely
(KERNEL-FACTS §3.6). Conditional jump offsets in classic BPF are 8 bits; the
assembler refuses to emit a jump it cannot encode instead of wrapping around.
``JA`` carries a 32-bit offset in ``k`` and is the way past a long block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# opcodes (linux/bpf_common.h)
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
JGT_K = 0x25
JSET_K = 0x45
JA = 0x05
RET_K = 0x06
ALU_AND_K = 0x54

# seccomp_data offsets
OFF_NR = 0
OFF_ARCH = 4


def arg_lo(i: int) -> int:
    """Offset of the low 32-bit word of args[i] (little-endian)."""
    return 16 + 8 * i


def arg_hi(i: int) -> int:
    return 20 + 8 * i


_INSN = struct.Struct("<HBBI")


@dataclass
class Asm:
    """Instructions with symbolic jump targets, resolved by :meth:`assemble`.

    A jump target is a label name or ``None`` (fall through). ``mark`` tags an
    instruction so its index can be found after assembly (for patching the
    worker's pid or the default action at entry).
    """

    insns: list[tuple[int, str | None, str | None, int, str | None]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"duplicate label {name}")
        self.labels[name] = len(self.insns)

    def ld(self, off: int) -> None:
        self.insns.append((LD_W_ABS, None, None, off, None))

    def and_(self, k: int) -> None:
        self.insns.append((ALU_AND_K, None, None, k & 0xFFFFFFFF, None))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None, mark: str | None = None) -> None:
        self.insns.append((code, jt, jf, k & 0xFFFFFFFF, mark))

    def ja(self, target: str) -> None:
        """Unconditional forward jump; the offset goes in ``k`` (32 bits)."""
        self.insns.append((JA, target, None, 0, None))

    def splice(self, other: Asm, prefix: str) -> None:
        """Append ``other`` (a self-contained piece: every jump in it targets
        its own labels, or its end), renaming its labels with ``prefix``."""
        base = len(self.insns)

        def rename(target: str | None) -> str | None:
            return None if target is None else prefix + target

        for code, jt, jf, k, mark in other.insns:
            self.insns.append((code, rename(jt), rename(jf), k, mark))
        for name, at in other.labels.items():
            self.label_at(prefix + name, base + at)

    def label_at(self, name: str, index: int) -> None:
        if name in self.labels:
            raise ValueError(f"duplicate label {name}")
        self.labels[name] = index

    def __len__(self) -> int:
        return len(self.insns)

    def ret(self, action: int, mark: str | None = None) -> None:
        self.insns.append((RET_K, None, None, action & 0xFFFFFFFF, mark))

    def assemble(self) -> tuple[bytes, dict[str, list[int]]]:
        out = bytearray()
        marks: dict[str, list[int]] = {}
        for i, (code, jt, jf, k, mark) in enumerate(self.insns):
            if code == JA:
                assert jt is not None
                t = f = 0
                k = self.labels[jt] - i - 1
                if k < 0:
                    raise ValueError(f"BPF jump from {i} to {jt} goes backwards")
            elif code in (LD_W_ABS, ALU_AND_K, RET_K):
                t = f = 0
            else:
                t, f = self._offset(i, jt), self._offset(i, jf)
            out += _INSN.pack(code, t, f, k)
            if mark is not None:
                marks.setdefault(mark, []).append(i)
        return bytes(out), marks

    def _offset(self, i: int, target: str | None) -> int:
        if target is None:
            return 0
        off = self.labels[target] - i - 1
        if not 0 <= off <= 255:
            raise ValueError(f"BPF jump from {i} to {target} out of range ({off})")
        return off


def patch_k(code: bytearray, index: int, k: int) -> None:
    """Overwrite the 32-bit constant of instruction ``index`` in place."""
    struct.pack_into("<I", code, index * 8 + 4, k & 0xFFFFFFFF)


def disassemble(code: bytes) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) for each instruction; for tests and debugging."""
    return [_INSN.unpack_from(code, i) for i in range(0, len(code), 8)]
