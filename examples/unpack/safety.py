"""The rules for untrusted archive members: names, types, and bomb limits.

Pure Python, no privsep. The *broker* runs :func:`check_name` and
:func:`check_type` on what the worker reports about each member, because the
worker parses hostile bytes and may be compromised; the *worker* runs
:class:`Budget` while it streams data, because only it sees the bytes.
"""

from __future__ import annotations

import re
import reprlib
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 64

# Refusal kinds, as they appear in the report.
PATH_TRAVERSAL = "path-traversal"  # zip-slip: a ".." component
ABSOLUTE = "absolute-name"  # "/etc/x", "C:\\x", "\\\\server\\x"
UNSAFE_NAME = "unsafe-name"  # NUL/control characters, backslashes, not UTF-8, too long, empty
SYMLINK = "symlink"
HARDLINK = "hardlink"
DEVICE = "device"
FIFO = "fifo"
UNSUPPORTED = "unsupported-type"
ENCRYPTED = "encrypted"
DUPLICATE = "duplicate"
CONFLICT = "conflict"  # a file where a directory is needed, or the reverse
BOMB = "bomb"  # compression ratio or total size over the limit
TOO_MANY = "too-many-members"
CORRUPT = "corrupt"
NOT_ARCHIVE = "not-an-archive"

_DRIVE = re.compile(r"^[A-Za-z]:")


class Refused(ValueError):
    """A member (or the whole archive) we will not extract. ``str()`` is ``"<kind>: <reason>"``."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


def split_reason(message: str) -> tuple[str, str]:
    """``"bomb: ..."`` -> ``("bomb", "...")``; unknown prefixes give ``("error", message)``."""
    kind, sep, reason = message.partition(": ")
    known = {PATH_TRAVERSAL, ABSOLUTE, UNSAFE_NAME, SYMLINK, HARDLINK, DEVICE, FIFO, UNSUPPORTED, ENCRYPTED,
             DUPLICATE, CONFLICT, BOMB, TOO_MANY, CORRUPT, NOT_ARCHIVE}  # fmt: skip
    if sep and kind in known:
        return kind, reason
    return "error", message


def printable(raw: bytes) -> str:
    """A member name as it may be shown on a terminal (no control characters, invalid UTF-8 escaped)."""
    return shown(raw.decode("utf-8", "backslashreplace"))


def shown(text: str) -> str:
    """``text`` as it may be shown on a terminal: control characters escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_name(raw: object) -> tuple[str, ...]:
    """Check a member name; return its components (empty for the archive's root, ``./``).

    Raises :class:`Refused`. Never touches the file system: the broker's
    ``openat2(RESOLVE_BENEATH)`` is the second, independent guard.
    """
    if not isinstance(raw, bytes):
        raise Refused(UNSAFE_NAME, "the member name is not a byte string")
    if len(raw) > MAX_NAME_BYTES:
        raise Refused(UNSAFE_NAME, f"the name is longer than {MAX_NAME_BYTES} bytes")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(UNSAFE_NAME, "the name is not valid UTF-8") from None
    if "\x00" in name:
        raise Refused(UNSAFE_NAME, "the name contains a NUL byte")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        raise Refused(UNSAFE_NAME, "the name contains control or invisible formatting characters")
    if name.startswith("/"):
        raise Refused(ABSOLUTE, "an absolute name would land outside the output directory")
    if _DRIVE.match(name) or name.startswith("\\\\"):
        raise Refused(ABSOLUTE, "a Windows drive or UNC name would land outside the output directory")
    if "\\" in name:
        parts_bs = name.replace("\\", "/").split("/")
        if ".." in parts_bs:
            raise Refused(PATH_TRAVERSAL, "'..' with backslash separators (zip-slip on Windows)")
        raise Refused(UNSAFE_NAME, "the name contains a backslash (a Windows path separator)")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise Refused(PATH_TRAVERSAL, "a '..' component would climb out of the output directory (zip-slip)")
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise Refused(UNSAFE_NAME, f"a component is longer than {MAX_COMPONENT_BYTES} bytes")
        parts.append(part)
    if len(parts) > MAX_DEPTH:
        raise Refused(UNSAFE_NAME, f"nested deeper than {MAX_DEPTH} directories")
    return tuple(parts)


#: Member types as the worker reports them.
FILE, DIR = "file", "dir"
_TYPE_REFUSALS = {
    "symlink": (SYMLINK, "symlink members are never extracted (a link could point anywhere)"),
    "hardlink": (HARDLINK, "hardlink members are never extracted (a link could point anywhere)"),
    "char": (DEVICE, "character device members are never extracted"),
    "block": (DEVICE, "block device members are never extracted"),
    "fifo": (FIFO, "FIFO members are never extracted"),
    "socket": (UNSUPPORTED, "socket members are never extracted"),
}


def check_type(member: dict[str, Any]) -> str:
    """Return ``"file"`` or ``"dir"`` for a member we extract; raise :class:`Refused` otherwise.

    ``member`` comes from the worker: every field is checked for its type before use.
    """
    kind = member.get("type")
    if kind in (FILE, DIR):
        if member.get("encrypted") is not False:
            raise Refused(ENCRYPTED, "encrypted members are not supported")
        return str(kind)
    if isinstance(kind, str) and kind in _TYPE_REFUSALS:
        refusal, reason = _TYPE_REFUSALS[kind]
        target = member.get("target")
        if isinstance(target, bytes) and target:
            reason += f"; it points to {printable(target[:256])!r}"
        raise Refused(refusal, reason)
    raise Refused(UNSUPPORTED, f"member type {reprlib.repr(kind)} is not extracted")


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1G"`` -> 1073741824; accepts K/M/G/T suffixes (binary), optional ``B``/``iB``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 500M or 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Limits:
    """Bomb limits. Checked on the bytes actually produced, never on what headers declare."""

    max_total: int = 1 << 30  # bytes written for the whole archive
    max_ratio: float = 100.0  # output bytes per compressed byte consumed
    ratio_grace: int = 1 << 20  # the ratio is only checked past this much output (small files compress oddly)
    max_members: int = 10_000

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> Limits:
        if not isinstance(data, dict) or set(data) != {"max_total", "max_ratio", "ratio_grace", "max_members"}:
            raise ValueError("malformed limits")
        return cls(
            max_total=int(data["max_total"]),
            max_ratio=float(data["max_ratio"]),
            ratio_grace=int(data["ratio_grace"]),
            max_members=int(data["max_members"]),
        )


class Budget:
    """Counts bytes while streaming and raises :class:`Refused` (``bomb``) the moment a limit is passed."""

    def __init__(self, limits: Limits, archive_size: int):
        self.limits = limits
        self.archive_size = max(1, archive_size)
        self.total_out = 0

    def check_member(self, out: int, consumed: int) -> None:
        """``out`` bytes of this member written so far, from ``consumed`` compressed bytes read."""
        lim = self.limits
        if self.total_out + out > lim.max_total:
            raise Refused(
                BOMB,
                f"extraction would pass the {_human(lim.max_total)} total-size limit (--max-total); stopped",
            )
        if out > lim.ratio_grace and out > lim.max_ratio * max(1, consumed):
            raise Refused(
                BOMB,
                f"member expands more than {lim.max_ratio:g}:1 ({_human(out)} so far from {_human(consumed)}"
                f" compressed; --max-ratio); stopped",
            )
        total = self.total_out + out
        if total > lim.ratio_grace and total > lim.max_ratio * self.archive_size:
            raise Refused(
                BOMB,
                f"archive expands more than {lim.max_ratio:g}:1 ({_human(total)} so far from a"
                f" {_human(self.archive_size)} archive; --max-ratio); stopped",
            )

    def check_skip(self, position: int) -> None:
        """Reading on to ``position`` of the decompressed stream (the next
        header, past members refused and not extracted): within --max-ratio of
        the archive too, or a tiny archive makes the decompressor run for hours."""
        lim = self.limits
        if position > lim.ratio_grace and position > lim.max_ratio * self.archive_size:
            raise Refused(
                BOMB,
                f"archive expands more than {lim.max_ratio:g}:1 (the next member starts {_human(position)} into"
                f" the data of a {_human(self.archive_size)} archive; --max-ratio); stopped",
            )

    def add(self, out: int) -> None:
        self.total_out += out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
