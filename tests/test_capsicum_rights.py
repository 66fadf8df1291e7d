"""FreeBSD Capsicum backend: the Rights -> CAP_* mapping and cap_rights_t encoding.

Part 1 runs everywhere (pure Python): every CAP_* value privsep uses is
checked against the #define lines of FreeBSD's header, evaluated here with the
header's own CAPRIGHT() macro, independently of the module under test.

    Source: freebsd/freebsd-src  sys/sys/capsicum.h  @032c239e83ef
            (commit 032c239e83ef2917921153ecb5daa6ab1abd4056)
    Validity rules: sys/kern/subr_capability.c @00d3456c7721
    Open flags:     sys/sys/fcntl.h @0069e95e9bc6
    (the revisions KERNEL-FACTS.md section 6 cites)

Part 2 is the runtime: it runs only on FreeBSD, each sandbox case in a forked
child. FreeBSD is untested in CI.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NotCapable, Rights, SandboxError, UnsupportedRights
from worker.sandbox import _capsicum
from worker.sandbox import _capsicum_rights as cr

IS_FREEBSD = sys.platform.startswith("freebsd")
freebsd_only = pytest.mark.skipif(
    not IS_FREEBSD, reason="FreeBSD Capsicum runtime: not this platform; FreeBSD is untested in CI"
)
not_freebsd = pytest.mark.skipif(IS_FREEBSD, reason="checks the fallbacks used where Capsicum does not exist")

# --------------------------------------------------------------------------
# The header, as data. Copied from freebsd/freebsd-src sys/sys/capsicum.h
# @032c239e83ef (whitespace normalised, comments dropped). Do not edit these
# lines to make a test pass: they are the reference.
# --------------------------------------------------------------------------
CAPSICUM_H = r"""
#define CAPRIGHT(idx, bit) ((1ULL << (57 + (idx))) | (bit))
#define CAP_READ CAPRIGHT(0, 0x0000000000000001ULL)
#define CAP_WRITE CAPRIGHT(0, 0x0000000000000002ULL)
#define CAP_SEEK_TELL CAPRIGHT(0, 0x0000000000000004ULL)
#define CAP_SEEK (CAP_SEEK_TELL | 0x0000000000000008ULL)
#define CAP_PREAD (CAP_SEEK | CAP_READ)
#define CAP_PWRITE (CAP_SEEK | CAP_WRITE)
#define CAP_MMAP CAPRIGHT(0, 0x0000000000000010ULL)
#define CAP_MMAP_R (CAP_MMAP | CAP_SEEK | CAP_READ)
#define CAP_MMAP_W (CAP_MMAP | CAP_SEEK | CAP_WRITE)
#define CAP_MMAP_X (CAP_MMAP | CAP_SEEK | 0x0000000000000020ULL)
#define CAP_MMAP_RW (CAP_MMAP_R | CAP_MMAP_W)
#define CAP_MMAP_RX (CAP_MMAP_R | CAP_MMAP_X)
#define CAP_MMAP_WX (CAP_MMAP_W | CAP_MMAP_X)
#define CAP_MMAP_RWX (CAP_MMAP_R | CAP_MMAP_W | CAP_MMAP_X)
#define CAP_CREATE CAPRIGHT(0, 0x0000000000000040ULL)
#define CAP_FEXECVE CAPRIGHT(0, 0x0000000000000080ULL)
#define CAP_FSYNC CAPRIGHT(0, 0x0000000000000100ULL)
#define CAP_FTRUNCATE CAPRIGHT(0, 0x0000000000000200ULL)
#define CAP_LOOKUP CAPRIGHT(0, 0x0000000000000400ULL)
#define CAP_FCHDIR CAPRIGHT(0, 0x0000000000000800ULL)
#define CAP_FCHFLAGS CAPRIGHT(0, 0x0000000000001000ULL)
#define CAP_CHFLAGSAT (CAP_FCHFLAGS | CAP_LOOKUP)
#define CAP_FCHMOD CAPRIGHT(0, 0x0000000000002000ULL)
#define CAP_FCHMODAT (CAP_FCHMOD | CAP_LOOKUP)
#define CAP_FCHOWN CAPRIGHT(0, 0x0000000000004000ULL)
#define CAP_FCHOWNAT (CAP_FCHOWN | CAP_LOOKUP)
#define CAP_FCNTL CAPRIGHT(0, 0x0000000000008000ULL)
#define CAP_FLOCK CAPRIGHT(0, 0x0000000000010000ULL)
#define CAP_FPATHCONF CAPRIGHT(0, 0x0000000000020000ULL)
#define CAP_FSCK CAPRIGHT(0, 0x0000000000040000ULL)
#define CAP_FSTAT CAPRIGHT(0, 0x0000000000080000ULL)
#define CAP_FSTATAT (CAP_FSTAT | CAP_LOOKUP)
#define CAP_FSTATFS CAPRIGHT(0, 0x0000000000100000ULL)
#define CAP_FUTIMES CAPRIGHT(0, 0x0000000000200000ULL)
#define CAP_FUTIMESAT (CAP_FUTIMES | CAP_LOOKUP)
#define CAP_LINKAT_TARGET (CAP_LOOKUP | 0x0000000000400000ULL)
#define CAP_MKDIRAT (CAP_LOOKUP | 0x0000000000800000ULL)
#define CAP_MKFIFOAT (CAP_LOOKUP | 0x0000000001000000ULL)
#define CAP_MKNODAT (CAP_LOOKUP | 0x0000000002000000ULL)
#define CAP_RENAMEAT_SOURCE (CAP_LOOKUP | 0x0000000004000000ULL)
#define CAP_SYMLINKAT (CAP_LOOKUP | 0x0000000008000000ULL)
#define CAP_UNLINKAT (CAP_LOOKUP | 0x0000000010000000ULL)
#define CAP_ACCEPT CAPRIGHT(0, 0x0000000020000000ULL)
#define CAP_BIND CAPRIGHT(0, 0x0000000040000000ULL)
#define CAP_CONNECT CAPRIGHT(0, 0x0000000080000000ULL)
#define CAP_GETPEERNAME CAPRIGHT(0, 0x0000000100000000ULL)
#define CAP_GETSOCKNAME CAPRIGHT(0, 0x0000000200000000ULL)
#define CAP_GETSOCKOPT CAPRIGHT(0, 0x0000000400000000ULL)
#define CAP_LISTEN CAPRIGHT(0, 0x0000000800000000ULL)
#define CAP_PEELOFF CAPRIGHT(0, 0x0000001000000000ULL)
#define CAP_RECV CAP_READ
#define CAP_SEND CAP_WRITE
#define CAP_SETSOCKOPT CAPRIGHT(0, 0x0000002000000000ULL)
#define CAP_SHUTDOWN CAPRIGHT(0, 0x0000004000000000ULL)
#define CAP_BINDAT (CAP_LOOKUP | 0x0000008000000000ULL)
#define CAP_CONNECTAT (CAP_LOOKUP | 0x0000010000000000ULL)
#define CAP_LINKAT_SOURCE (CAP_LOOKUP | 0x0000020000000000ULL)
#define CAP_RENAMEAT_TARGET (CAP_LOOKUP | 0x0000040000000000ULL)
#define CAP_ALL0 CAPRIGHT(0, 0x000007FFFFFFFFFFULL)
#define CAP_MAC_GET CAPRIGHT(1, 0x0000000000000001ULL)
#define CAP_MAC_SET CAPRIGHT(1, 0x0000000000000002ULL)
#define CAP_SEM_GETVALUE CAPRIGHT(1, 0x0000000000000004ULL)
#define CAP_SEM_POST CAPRIGHT(1, 0x0000000000000008ULL)
#define CAP_SEM_WAIT CAPRIGHT(1, 0x0000000000000010ULL)
#define CAP_EVENT CAPRIGHT(1, 0x0000000000000020ULL)
#define CAP_KQUEUE_EVENT CAPRIGHT(1, 0x0000000000000040ULL)
#define CAP_IOCTL CAPRIGHT(1, 0x0000000000000080ULL)
#define CAP_TTYHOOK CAPRIGHT(1, 0x0000000000000100ULL)
#define CAP_PDGETPID CAPRIGHT(1, 0x0000000000000200ULL)
#define CAP_PDWAIT CAPRIGHT(1, 0x0000000000000400ULL)
#define CAP_PDKILL CAPRIGHT(1, 0x0000000000000800ULL)
#define CAP_EXTATTR_DELETE CAPRIGHT(1, 0x0000000000001000ULL)
#define CAP_EXTATTR_GET CAPRIGHT(1, 0x0000000000002000ULL)
#define CAP_EXTATTR_LIST CAPRIGHT(1, 0x0000000000004000ULL)
#define CAP_EXTATTR_SET CAPRIGHT(1, 0x0000000000008000ULL)
#define CAP_ACL_CHECK CAPRIGHT(1, 0x0000000000010000ULL)
#define CAP_ACL_DELETE CAPRIGHT(1, 0x0000000000020000ULL)
#define CAP_ACL_GET CAPRIGHT(1, 0x0000000000040000ULL)
#define CAP_ACL_SET CAPRIGHT(1, 0x0000000000080000ULL)
#define CAP_KQUEUE_CHANGE CAPRIGHT(1, 0x0000000000100000ULL)
#define CAP_KQUEUE (CAP_KQUEUE_EVENT | CAP_KQUEUE_CHANGE)
#define CAP_ALL1 CAPRIGHT(1, 0x00000000001FFFFFULL)
#define CAP_FCNTL_GETFL (1 << F_GETFL)
#define CAP_FCNTL_SETFL (1 << F_SETFL)
#define CAP_FCNTL_GETOWN (1 << F_GETOWN)
#define CAP_FCNTL_SETOWN (1 << F_SETOWN)
#define CAP_FCNTL_ALL (CAP_FCNTL_GETFL | CAP_FCNTL_SETFL | CAP_FCNTL_GETOWN | CAP_FCNTL_SETOWN)
"""

# sys/sys/fcntl.h @0069e95e9bc6, the lines the FreeBSD resolver and the fcntl masks use.
FCNTL_H = r"""
#define O_RDONLY 0x0000
#define O_WRONLY 0x0001
#define O_RDWR 0x0002
#define O_ACCMODE 0x0003
#define O_NONBLOCK 0x0004
#define O_APPEND 0x0008
#define O_SHLOCK 0x0010
#define O_EXLOCK 0x0020
#define O_ASYNC 0x0040
#define O_FSYNC 0x0080
#define O_SYNC 0x0080
#define O_NOFOLLOW 0x0100
#define O_CREAT 0x0200
#define O_TRUNC 0x0400
#define O_EXCL 0x0800
#define O_NOCTTY 0x8000
#define O_DIRECT 0x00010000
#define O_DIRECTORY 0x00020000
#define O_EXEC 0x00040000
#define O_TTY_INIT 0x00080000
#define O_CLOEXEC 0x00100000
#define O_VERIFY 0x00200000
#define O_PATH 0x00400000
#define O_RESOLVE_BENEATH 0x00800000
#define O_DSYNC 0x01000000
#define AT_FDCWD -100
#define AT_SYMLINK_NOFOLLOW 0x0200
#define AT_RESOLVE_BENEATH 0x2000
#define AT_EMPTY_PATH 0x4000
#define F_GETFL 3
#define F_SETFL 4
#define F_GETOWN 5
#define F_SETOWN 6
"""


def _eval_defines(text: str, env: dict[str, int] | None = None) -> dict[str, int]:
    """Evaluate simple C object-like #defines (ints, |, <<, parens, CAPRIGHT)."""
    env = dict(env or {})
    out: dict[str, int] = {}

    def capright(idx: int, bit: int) -> int:
        return (1 << (57 + idx)) | bit

    for line in text.strip().splitlines():
        m = re.fullmatch(r"#define\s+(\w+)(\(.*?\))?\s+(.+)", line.strip())
        assert m, line
        name, params, body = m.groups()
        if params:  # the CAPRIGHT macro itself: checked below against our helper
            continue
        expr = re.sub(r"\b(0x[0-9A-Fa-f]+|\d+)ULL\b", r"\1", body)
        assert re.fullmatch(r"[\w\s|<>()+,\-]+", expr), line
        value = eval(expr, {"__builtins__": {}, "CAPRIGHT": capright}, {**env, **out})
        assert isinstance(value, int)
        out[name] = value
    return out


FCNTL_DEFS = _eval_defines(FCNTL_H)
HEADER = _eval_defines(CAPSICUM_H, FCNTL_DEFS)

# Rights privsep names with a header constant of the same name.
SAME_NAME = [n for n in cr.FREEBSD_RIGHTS if f"CAP_{n}" in HEADER]

# Every single privsep bit (what a random Rights set is made of).
SINGLE_BITS = [m for m in Rights if m]


# ==========================================================================
# Part 1: values and encoding (every platform)
# ==========================================================================


def test_header_excerpt_is_what_kernel_facts_says() -> None:
    # Literal numbers from KERNEL-FACTS 6.1/6.2, a second, independent source.
    literals = {
        "CAP_READ": 0x0200000000000001,
        "CAP_WRITE": 0x0200000000000002,
        "CAP_SEEK_TELL": 0x0200000000000004,
        "CAP_SEEK": 0x020000000000000C,
        "CAP_PREAD": 0x020000000000000D,
        "CAP_PWRITE": 0x020000000000000E,
        "CAP_MMAP": 0x0200000000000010,
        "CAP_MMAP_R": 0x020000000000001D,
        "CAP_MMAP_W": 0x020000000000001E,
        "CAP_MMAP_X": 0x020000000000003C,
        "CAP_MMAP_RWX": 0x020000000000003F,
        "CAP_CREATE": 0x0200000000000040,
        "CAP_FEXECVE": 0x0200000000000080,
        "CAP_FSYNC": 0x0200000000000100,
        "CAP_FTRUNCATE": 0x0200000000000200,
        "CAP_LOOKUP": 0x0200000000000400,
        "CAP_FCHDIR": 0x0200000000000800,
        "CAP_FCHMOD": 0x0200000000002000,
        "CAP_FCHMODAT": 0x0200000000002400,
        "CAP_FCHOWN": 0x0200000000004000,
        "CAP_FCNTL": 0x0200000000008000,
        "CAP_FLOCK": 0x0200000000010000,
        "CAP_FSTAT": 0x0200000000080000,
        "CAP_FSTATAT": 0x0200000000080400,
        "CAP_FSTATFS": 0x0200000000100000,
        "CAP_FUTIMES": 0x0200000000200000,
        "CAP_LINKAT_TARGET": 0x0200000000400400,
        "CAP_MKDIRAT": 0x0200000000800400,
        "CAP_MKFIFOAT": 0x0200000001000400,
        "CAP_RENAMEAT_SOURCE": 0x0200000004000400,
        "CAP_SYMLINKAT": 0x0200000008000400,
        "CAP_UNLINKAT": 0x0200000010000400,
        "CAP_LINKAT_SOURCE": 0x0200020000000400,
        "CAP_RENAMEAT_TARGET": 0x0200040000000400,
        "CAP_ACCEPT": 0x0200000020000000,
        "CAP_BIND": 0x0200000040000000,
        "CAP_CONNECT": 0x0200000080000000,
        "CAP_GETSOCKOPT": 0x0200000400000000,
        "CAP_SETSOCKOPT": 0x0200002000000000,
        "CAP_LISTEN": 0x0200000800000000,
        "CAP_SHUTDOWN": 0x0200004000000000,
        "CAP_EVENT": 0x0400000000000020,
        "CAP_IOCTL": 0x0400000000000080,
        "CAP_KQUEUE_EVENT": 0x0400000000000040,
        "CAP_KQUEUE_CHANGE": 0x0400000000100000,
        "CAP_PDGETPID": 0x0400000000000200,
        "CAP_PDKILL": 0x0400000000000800,
        "CAP_ALL0": 0x020007FFFFFFFFFF,
        "CAP_ALL1": 0x04000000001FFFFF,
        "CAP_FCNTL_GETFL": 8,
        "CAP_FCNTL_SETFL": 16,
        "CAP_FCNTL_GETOWN": 32,
        "CAP_FCNTL_SETOWN": 64,
        "CAP_FCNTL_ALL": 120,
    }
    for name, value in literals.items():
        assert HEADER[name] == value, name
    assert HEADER["CAP_RECV"] == HEADER["CAP_READ"]
    assert HEADER["CAP_SEND"] == HEADER["CAP_WRITE"]


def test_every_module_constant_equals_the_header() -> None:
    module = {n: v for n, v in vars(cr).items() if n.startswith("CAP_") and isinstance(v, int)}
    for name, value in HEADER.items():
        assert name in module, f"{name} from capsicum.h is missing in _capsicum_rights"
        assert module[name] == value, f"{name}: module {module[name]:#x} != header {value:#x}"
    extra = set(module) - set(HEADER) - {"CAP_RIGHTS_VERSION", "CAP_RIGHTS_SIZE", "CAP_IOCTLS_ALL"}
    assert not extra, f"module constants not in the header excerpt: {extra}"
    assert cr.CAP_RIGHTS_VERSION == 0
    assert cr.CAP_RIGHTS_SIZE == 16
    assert cr.CAP_IOCTLS_ALL == 2**63 - 1  # SSIZE_MAX on 64-bit
    # the CAPRIGHT macro itself
    for idx in (0, 1):
        for bit in (0, 1, 1 << 40):
            assert cr.CAPRIGHT(idx, bit) == (1 << (57 + idx)) | bit


def test_cap_none_and_cap_all() -> None:
    assert cr.CAP_NONE == (0x0200000000000000, 0x0400000000000000)
    assert (cr.CAPRIGHT(0, 0), cr.CAPRIGHT(1, 0)) == cr.CAP_NONE
    assert cr.cap_rights_is_valid(*cr.CAP_NONE)
    assert cr.cap_rights_is_valid(HEADER["CAP_ALL0"], HEADER["CAP_ALL1"])


@pytest.mark.parametrize("name", SAME_NAME)
def test_mapped_value_equals_header_constant(name: str) -> None:
    assert cr.FREEBSD_RIGHTS[name][0] == HEADER[f"CAP_{name}"]


def test_rights_without_a_same_named_constant() -> None:
    assert set(cr.FREEBSD_RIGHTS) - set(SAME_NAME) == {"RENAMEAT", "APPEND"}
    assert cr.FREEBSD_RIGHTS["RENAMEAT"][0] == HEADER["CAP_RENAMEAT_SOURCE"] | HEADER["CAP_RENAMEAT_TARGET"]
    assert cr.FREEBSD_RIGHTS["APPEND"][0] == 0
    assert cr.to_cap_values(Rights.APPEND) == []


def test_table_covers_every_public_right() -> None:
    public = {n for n in Rights.__members__ if n != "NONE" and not n.startswith("_")}
    assert set(cr.FREEBSD_RIGHTS) == public
    for name, (value, how) in cr.FREEBSD_RIGHTS.items():
        assert how.strip(), name
        assert value == _or(cr.to_cap_values(Rights[name])), name
        names = cr.cap_names(name)
        if value:  # the names shown in the docs evaluate to the value
            assert _or(HEADER[n.strip()] for n in names.split("|")) == value, name


def test_composite_rules() -> None:
    h = HEADER
    assert h["CAP_SEEK"] & ~h["CAP_SEEK_TELL"] == 0x8 and h["CAP_SEEK"] & h["CAP_SEEK_TELL"] == h["CAP_SEEK_TELL"]
    assert h["CAP_PREAD"] == h["CAP_SEEK"] | h["CAP_READ"]
    assert h["CAP_PWRITE"] == h["CAP_SEEK"] | h["CAP_WRITE"]
    assert h["CAP_MMAP_R"] == h["CAP_MMAP"] | h["CAP_SEEK"] | h["CAP_READ"]
    assert h["CAP_MMAP_W"] == h["CAP_MMAP"] | h["CAP_SEEK"] | h["CAP_WRITE"]
    assert h["CAP_MMAP_X"] == h["CAP_MMAP"] | h["CAP_SEEK"] | cr.CAPRIGHT(0, 0x20)
    for name in ("MKDIRAT", "UNLINKAT", "RENAMEAT_SOURCE", "RENAMEAT_TARGET", "FSTATAT", "FCHMODAT", "FUTIMESAT"):
        assert h[f"CAP_{name}"] & h["CAP_LOOKUP"] == h["CAP_LOOKUP"], name
    # privsep's composites encode to exactly the header's composites
    for name in ("MMAP_R", "MMAP_W", "MMAP_X", "PREAD", "PWRITE"):
        assert cr.encode_cap_words(Rights[name]) == (h[f"CAP_{name}"], cr.CAP_NONE[1]), name
    assert cr.encode_cap_words(Rights.MMAP_R | Rights.MMAP_W | Rights.MMAP_X)[0] == h["CAP_MMAP_RWX"]
    # forming an *AT composite from two privsep rights
    assert cr.encode_cap_words(Rights.FSTAT | Rights.LOOKUP)[0] == h["CAP_FSTATAT"]
    assert cr.encode_cap_words(Rights.FCHMOD | Rights.LOOKUP)[0] == h["CAP_FCHMODAT"]
    assert cr.encode_cap_words(Rights.FUTIMES | Rights.LOOKUP)[0] == h["CAP_FUTIMESAT"]
    # privsep's own composites agree with Capsicum's shape
    assert Rights.READ in Rights.MMAP_R and Rights.SEEK in Rights.MMAP_X


def test_index_markers() -> None:
    index1 = {Rights.IOCTL, Rights.EVENT}
    for member in SINGLE_BITS:
        for value in cr.to_cap_values(member):
            marker = cr.CAPIDXBIT(value)
            assert marker in (1, 2), member  # exactly one marker bit
            assert cr.CAPRVER(value) == 0, member
            assert marker == (2 if member in index1 else 1), member


def test_encoding_bytes() -> None:
    assert cr.encode_cap_rights(Rights.NONE) == struct.pack("<QQ", 0x0200000000000000, 0x0400000000000000)
    assert cr.encode_cap_rights(Rights.READ) == bytes.fromhex("01000000000000020000000000000004")
    assert cr.encode_cap_words(Rights.READ | Rights.IOCTL) == (0x0200000000000001, 0x0400000000000080)
    assert cr.encode_cap_words(Rights.EVENT | Rights.IOCTL) == (cr.CAP_NONE[0], 0x04000000000000A0)
    assert cr.encode_cap_words(Rights.READ | Rights.FSTAT | Rights.SEEK) == (0x020000000008000D, cr.CAP_NONE[1])
    assert len(cr.encode_cap_rights(Rights.all())) == 16


def test_index1_rights_never_land_in_element0() -> None:
    w0, w1 = cr.encode_cap_words(Rights.IOCTL | Rights.EVENT)
    assert w0 == cr.CAP_NONE[0]
    w0, w1 = cr.encode_cap_words(Rights.all() & ~(Rights.IOCTL | Rights.EVENT))
    assert w1 == cr.CAP_NONE[1]


def test_invalid_mixing_is_refused() -> None:
    both = HEADER["CAP_READ"] | HEADER["CAP_IOCTL"]
    for bad in (both, 0x1, 0, 1 << 64, HEADER["CAP_READ"] | (1 << 62), -1):
        with pytest.raises(ValueError):
            cr._index_of(bad)
    n0, n1 = cr.CAP_NONE
    invalid = [
        (n0 | HEADER["CAP_IOCTL"], n1),  # index-1 right in element 0
        (n0, n1 | HEADER["CAP_READ"]),  # index-0 right in element 1
        (n0 | (1 << 62), n1),  # version 1
        (0x1, n1),  # element 0 without its marker
        (n0, 0x80),  # element 1 without its marker
        (n1, n0),  # swapped
        (n0 | (1 << 50), n1),  # unused index-0 bit (outside CAP_ALL0)
        (n0, n1 | (1 << 30)),  # unused index-1 bit (outside CAP_ALL1)
        (n0, n1 | (1 << 62)),  # version bits in element 1
        (1 << 64, n1),
    ]
    for w0, w1 in invalid:
        assert not cr.cap_rights_is_valid(w0, w1), (hex(w0), hex(w1))
        with pytest.raises(ValueError):
            cr.decode_cap_words(w0, w1)
    with pytest.raises(ValueError):
        cr.decode_cap_rights(b"\0" * 15)


def test_unknown_privsep_bits_are_refused() -> None:
    with pytest.raises(ValueError):
        cr.to_cap_values(Rights(1 << 40))
    with pytest.raises(ValueError):
        cr.encode_cap_rights(Rights.READ | Rights(1 << 21))


def test_decode_single_and_strict() -> None:
    n0, n1 = cr.CAP_NONE
    assert cr.decode_cap_words(n0, n1) == Rights.NONE
    # SEEK_TELL alone is not SEEK
    assert cr.decode_cap_words(HEADER["CAP_SEEK_TELL"], n1) == Rights.NONE
    with pytest.raises(ValueError, match="CAP_SEEK_TELL"):
        cr.decode_cap_words(HEADER["CAP_SEEK_TELL"], n1, strict=True)
    # a right privsep does not map
    assert cr.decode_cap_words(HEADER["CAP_READ"] | HEADER["CAP_FCHDIR"], n1) == Rights.READ
    with pytest.raises(ValueError, match="CAP_FCHDIR"):
        cr.decode_cap_words(HEADER["CAP_READ"] | HEADER["CAP_FCHDIR"], n1, strict=True)
    with pytest.raises(ValueError, match="CAP_PDKILL"):
        cr.decode_cap_words(n0, HEADER["CAP_PDKILL"], strict=True)
    # CAP_ALL holds everything privsep maps
    everything = Rights.all() & ~Rights.APPEND
    assert cr.decode_cap_words(HEADER["CAP_ALL0"], HEADER["CAP_ALL1"]) == everything
    # half of RENAMEAT is not RENAMEAT, but its LOOKUP part is LOOKUP
    assert cr.decode_cap_words(HEADER["CAP_RENAMEAT_SOURCE"], n1) == Rights.LOOKUP


@pytest.mark.parametrize("name", sorted(cr.FREEBSD_RIGHTS))
def test_round_trip_each_right(name: str) -> None:
    r = Rights[name]
    raw = cr.encode_cap_rights(r)
    back = cr.decode_cap_rights(raw, strict=True)
    assert back == cr.freebsd_effective_rights(r)
    assert cr.encode_cap_rights(back) == raw
    expected = (r | (Rights.LOOKUP if r & (Rights.UNLINKAT | Rights.MKDIRAT | Rights.RENAMEAT) else Rights.NONE)) & ~(
        Rights.APPEND
    )
    assert back == expected


def test_implied_rights() -> None:
    assert cr.implied_rights(Rights.READ | Rights.MMAP_R) == Rights.NONE
    for r in (Rights.UNLINKAT, Rights.MKDIRAT, Rights.RENAMEAT):
        assert cr.implied_rights(r) == Rights.LOOKUP
        assert cr.implied_rights(r | Rights.LOOKUP) == Rights.NONE
    assert cr.freebsd_effective_rights(Rights.WRITE | Rights.APPEND) == Rights.WRITE


rights_sets = st.lists(st.sampled_from(SINGLE_BITS), max_size=len(SINGLE_BITS)).map(lambda ms: _or_rights(ms))


@settings(max_examples=500, deadline=None)
@given(rights_sets)
def test_property_encoding_always_valid(r: Rights) -> None:
    raw = cr.encode_cap_rights(r)
    assert len(raw) == 16
    w0, w1 = struct.unpack("<QQ", raw)
    # each element: exactly its own index marker, version 0
    assert cr.CAPIDXBIT(w0) == 1 and cr.CAPIDXBIT(w1) == 2
    assert cr.CAPRVER(w0) == 0 and cr.CAPRVER(w1) == 0
    assert w0 & ~HEADER["CAP_ALL0"] == 0 and w1 & ~HEADER["CAP_ALL1"] == 0
    assert cr.cap_rights_is_valid(w0, w1)
    # the element follows the marker of every value, never the other one
    for v in cr.to_cap_values(r):
        element = w0 if cr.CAPIDXBIT(v) == 1 else w1
        assert element & v == v
    # round trip
    back = cr.decode_cap_rights(raw, strict=True)
    assert back == cr.freebsd_effective_rights(r)
    assert (r & ~Rights.APPEND) in back
    assert cr.implied_rights(r) & ~Rights.LOOKUP == Rights.NONE
    assert cr.encode_cap_rights(back) == raw


@settings(max_examples=300, deadline=None)
@given(rights_sets, rights_sets)
def test_property_kernel_containment_matches_rights(a: Rights, b: Rights) -> None:
    ea, eb = cr.encode_cap_words(a), cr.encode_cap_words(b)
    # union of sets is OR of encodings
    eab = cr.encode_cap_words(a | b)
    assert eab == (ea[0] | eb[0], ea[1] | eb[1])
    assert cr.cap_rights_contains(eab, ea) and cr.cap_rights_contains(eab, eb)
    # the kernel's "may I limit a to b" (cap_rights_contains) agrees with
    # privsep's "b is within a" on what each set really grants
    fa, fb = cr.freebsd_effective_rights(a), cr.freebsd_effective_rights(b)
    assert cr.cap_rights_contains(ea, eb) == (fb in fa)


def test_fcntl_limit() -> None:
    assert (cr.CAP_FCNTL_GETFL, cr.CAP_FCNTL_SETFL, cr.CAP_FCNTL_GETOWN, cr.CAP_FCNTL_SETOWN) == (8, 16, 32, 64)
    assert 1 << FCNTL_DEFS["F_GETFL"] == cr.CAP_FCNTL_GETFL
    assert 1 << FCNTL_DEFS["F_SETOWN"] == cr.CAP_FCNTL_SETOWN
    assert cr.CAP_FCNTL_ALL == 120
    assert cr.fcntl_limit(Rights.READ) == 0
    assert cr.fcntl_limit(Rights.READ | Rights.FCNTL) == 8 | 16 | 32
    assert cr.fcntl_limit(Rights.WRITE | Rights.APPEND | Rights.FCNTL) == 8 | 32  # cannot clear O_APPEND
    for r in (Rights.FCNTL, Rights.all()):
        assert not cr.fcntl_limit(r) & cr.CAP_FCNTL_SETOWN
        assert cr.fcntl_limit(r) & ~cr.CAP_FCNTL_ALL == 0


def test_ioctl_limit() -> None:
    assert cr.ioctl_limit(Rights.READ) == []
    assert cr.ioctl_limit(Rights.READ, [0x4004667F]) == []  # no IOCTL right: none, whatever the list
    assert cr.ioctl_limit(Rights.IOCTL) is None  # every ioctl: no cap_ioctls_limit call
    assert cr.ioctl_limit(Rights.IOCTL, []) == []
    assert cr.ioctl_limit(Rights.IOCTL, [0x8004667E, 0x4004667F, 0x8004667E]) == [0x4004667F, 0x8004667E]
    assert cr.ioctl_limit(Rights.IOCTL, [2**64 - 1]) == [2**64 - 1]  # cap_ioctl_t is unsigned long
    for bad in ([-1], [2**64], [True], ["FIONREAD"]):
        with pytest.raises(ValueError):
            cr.ioctl_limit(Rights.IOCTL, bad)  # type: ignore[arg-type]
    assert len(cr.ioctl_limit(Rights.IOCTL, range(256)) or []) == 256
    with pytest.raises(ValueError):
        cr.ioctl_limit(Rights.IOCTL, range(257))


def test_docs_carry_the_generated_table() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "freebsd.md").read_text()
    assert "FreeBSD is untested in CI" in doc
    m = re.search(r"<!-- BEGIN FREEBSD_RIGHTS[^>]*-->\n(.*?)<!-- END FREEBSD_RIGHTS -->", doc, re.S)
    assert m, "docs/freebsd.md lacks the FREEBSD_RIGHTS markers"
    assert m.group(1) == cr.render_markdown_table(), (
        "docs/freebsd.md is stale: regenerate with python3 -m worker.sandbox._capsicum_rights"
    )
    for name in cr.FREEBSD_RIGHTS:
        assert f"| `{name}` |" in doc, name


def test_resolver_constants_equal_fcntl_h() -> None:
    from broker import _resolve_freebsd as rf

    for name, value in FCNTL_DEFS.items():
        if name.startswith(("O_", "AT_")):
            assert getattr(rf, name) == value, name
    assert rf.KNOWN_O_FLAGS & rf.O_RESOLVE_BENEATH
    assert rf.ENOTCAPABLE == 93 and rf.ECAPMODE == 94


def test_capsicum_cdef_parses_everywhere() -> None:
    ffi = _capsicum.make_ffi()
    assert ffi.sizeof("cap_rights_t") == 16
    assert ffi.sizeof("cap_ioctl_t") == ffi.sizeof("unsigned long")
    r = ffi.new("cap_rights_t *")
    r.cr_rights[0], r.cr_rights[1] = cr.encode_cap_words(Rights.READ | Rights.IOCTL)
    if sys.byteorder == "little":
        assert bytes(ffi.buffer(r)) == cr.encode_cap_rights(Rights.READ | Rights.IOCTL)
    assert _capsicum.ENOTCAPABLE == 93 and _capsicum.ECAPMODE == 94


# -- off FreeBSD: honest refusals -------------------------------------------


@not_freebsd
def test_capsicum_off_freebsd_refuses() -> None:
    assert _capsicum.available() is False
    assert _capsicum.in_capability_mode() is False
    with pytest.raises(UnsupportedRights, match="FreeBSD") as ei:
        _capsicum.limit_fd(0, Rights.READ)
    assert isinstance(ei.value, NotCapable) and isinstance(ei.value, PermissionError)
    with pytest.raises(SandboxError, match="FreeBSD"):
        _capsicum.enter_capability_mode()
    with pytest.raises(UnsupportedRights):
        _capsicum.get_rights(0)


@not_freebsd
def test_resolver_off_freebsd_refuses() -> None:
    from broker import _resolve_freebsd as rf

    assert rf.beneath_supported() is False
    with pytest.raises(OSError) as ei:
        rf.openat_beneath(rf.AT_FDCWD, "x", rf.O_RDONLY)
    assert ei.value.errno == errno.ENOSYS


# ==========================================================================
# Part 2: runtime (FreeBSD only; each sandbox case in a forked child)
# ==========================================================================


def run_in_child(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child; return what it returned, or its exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            msg = fn()
        except BaseException as exc:
            msg, code = f"{type(exc).__name__}: {exc}", 1
        try:
            os.write(w, msg.encode()[:60000])
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert os.WIFEXITED(status), f"child died: status {status:#x}; output {out!r}"
    return out


def _expect_errno(err: int, fn: Callable[[], object]) -> None:
    try:
        fn()
    except OSError as exc:
        assert exc.errno == err, f"expected errno {err}, got {exc.errno} ({exc})"
    else:
        raise AssertionError(f"expected errno {err}, but the call succeeded")


def test_run_in_child_reports_results_and_exceptions() -> None:
    # the helper the FreeBSD cases rely on, exercised on every platform
    assert run_in_child(lambda: "ok") == "ok"
    assert run_in_child(lambda: str(_capsicum.in_capability_mode())) == "False"

    def boom() -> str:
        raise ValueError("bad")

    assert run_in_child(boom) == "ValueError: bad"


@freebsd_only
def test_freebsd_available() -> None:
    assert _capsicum.available()


@freebsd_only
def test_freebsd_limit_fd_read_ok_write_enotcapable(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"hello world")

    def child() -> str:
        fd = os.open(p, os.O_RDWR)
        _capsicum.limit_fd(fd, Rights.READ | Rights.FSTAT)
        assert _capsicum.get_rights(fd) == Rights.READ | Rights.FSTAT
        assert os.read(fd, 5) == b"hello"
        os.fstat(fd)
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.write(fd, b"x"))
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.lseek(fd, 0, os.SEEK_SET))
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.ftruncate(fd, 0))
        return "ok"

    assert run_in_child(child) == "ok"
    assert p.read_bytes() == b"hello world"


@freebsd_only
def test_freebsd_cap_enter_then_open_is_ecapmode(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_text("x")

    def child() -> str:
        assert not _capsicum.in_capability_mode()
        _capsicum.enter_capability_mode()
        assert _capsicum.in_capability_mode()
        _expect_errno(_capsicum.ECAPMODE, lambda: os.open(str(p), os.O_RDONLY))
        _expect_errno(_capsicum.ECAPMODE, lambda: os.open("f", os.O_RDONLY, dir_fd=None))
        _capsicum.enter_capability_mode()  # a no-op when already there
        return "ok"

    assert run_in_child(child) == "ok"


@freebsd_only
def test_freebsd_rights_cannot_be_widened(tmp_path: Path) -> None:
    import fcntl
    import termios

    fionread = getattr(termios, "FIONREAD", 0x4004667F)
    fionbio = getattr(termios, "FIONBIO", 0x8004667E)
    p = tmp_path / "f"
    p.write_bytes(b"data")

    def child() -> str:
        fd = os.open(p, os.O_RDWR)
        _capsicum.limit_fd(fd, Rights.READ)
        try:
            _capsicum.limit_fd(fd, Rights.READ | Rights.WRITE)
        except NotCapable as exc:
            assert exc.errno == _capsicum.ENOTCAPABLE
            assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == _capsicum.ENOTCAPABLE
        else:
            raise AssertionError("widening READ to READ|WRITE succeeded")
        assert _capsicum.get_rights(fd) == Rights.READ
        _capsicum.limit_fd(fd, Rights.NONE)  # shrinking always works
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.read(fd, 1))

        # ioctl allow-list: FIONREAD yes, FIONBIO no, and the list cannot grow
        fd2 = os.open(p, os.O_RDONLY)
        _capsicum.limit_fd(fd2, Rights.READ | Rights.IOCTL, ioctls=[fionread])
        assert _capsicum.get_ioctls(fd2) == [fionread]
        fcntl.ioctl(fd2, fionread, b"\0\0\0\0")
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: fcntl.ioctl(fd2, fionbio, b"\1\0\0\0"))
        try:
            _capsicum.limit_fd(fd2, Rights.READ | Rights.IOCTL, ioctls=[fionread, fionbio])
        except NotCapable as exc:
            assert exc.errno == _capsicum.ENOTCAPABLE
        else:
            raise AssertionError("widening the ioctl list succeeded")

        # APPEND: O_APPEND stays because F_SETFL is withheld
        fd3 = os.open(p, os.O_WRONLY | os.O_APPEND)
        _capsicum.limit_fd(fd3, Rights.WRITE | Rights.APPEND | Rights.FCNTL)
        assert _capsicum.get_fcntls(fd3) == cr.CAP_FCNTL_GETFL | cr.CAP_FCNTL_GETOWN
        assert fcntl.fcntl(fd3, fcntl.F_GETFL) & os.O_APPEND
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: fcntl.fcntl(fd3, fcntl.F_SETFL, 0))
        fd4 = os.open(p, os.O_WRONLY)
        try:
            _capsicum.limit_fd(fd4, Rights.WRITE | Rights.APPEND)
        except UnsupportedRights:
            pass
        else:
            raise AssertionError("APPEND accepted on an fd without O_APPEND")
        return "ok"

    assert run_in_child(child) == "ok"


@freebsd_only
def test_freebsd_encoding_matches_libc_and_kernel(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    samples = [Rights[n] for n in cr.FREEBSD_RIGHTS if n != "APPEND"] + [
        Rights.READ | Rights.FSTAT | Rights.SEEK,
        Rights.LOOKUP | Rights.CREATE | Rights.UNLINKAT | Rights.RENAMEAT | Rights.MKDIRAT,
        Rights.MMAP_R | Rights.MMAP_W | Rights.MMAP_X | Rights.IOCTL | Rights.EVENT,
        Rights.all() & ~Rights.APPEND,
    ]

    def child() -> str:
        for r in samples:
            ours = cr.encode_cap_words(r)
            assert _capsicum.libc_rights_init(cr.to_cap_values(r)) == ours, r
            fd = os.open(p, os.O_RDONLY)
            try:
                _capsicum.limit_fd(fd, r)
                assert _capsicum.get_rights_words(fd) == ours, r
                assert _capsicum.get_rights(fd) == cr.freebsd_effective_rights(r), r
            finally:
                os.close(fd)
        return "ok"

    assert run_in_child(child) == "ok"


def _freebsd_major() -> int:
    try:
        return int(platform.release().split(".")[0])
    except ValueError:
        return 0


@freebsd_only
def test_freebsd_resolve_beneath_refuses_escapes(tmp_path: Path) -> None:
    from broker import _resolve_freebsd as rf

    base = tmp_path / "base"
    sub = base / "sub"
    (sub / "deeper").mkdir(parents=True)
    (base / "x").write_text("outside")
    (sub / "inside").write_text("inside")
    (sub / "link_out").symlink_to("../x")
    (sub / "link_in").symlink_to("inside")

    assert rf.beneath_supported()
    dirfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("inside", "link_in", "./inside"):
            fd = rf.openat_beneath(dirfd, name, os.O_RDONLY)
            assert os.read(fd, 100) == b"inside"
            os.close(fd)
        # '..' out of the directory, directly, from below, or through a symlink.
        # FreeBSD 14 says ENOTCAPABLE; FreeBSD 13 may treat '..' at the top as
        # the top itself (ENOENT here). Never may it open base/x.
        allowed = {rf.ENOTCAPABLE} if _freebsd_major() >= 14 else {rf.ENOTCAPABLE, errno.ENOENT}
        for bad in ("../x", "deeper/../../x", "link_out"):
            with pytest.raises(OSError) as ei:
                rf.openat_beneath(dirfd, bad, os.O_RDONLY)
            assert ei.value.errno in allowed, bad
        # an absolute path is refused outright
        with pytest.raises(NotCapable) as ei2:
            rf.openat_beneath(dirfd, str(base / "x"), os.O_RDONLY)
        assert ei2.value.errno == rf.ENOTCAPABLE
        assert isinstance(ei2.value.__cause__, OSError)
        # a flag FreeBSD does not define is refused, not silently ignored
        with pytest.raises(ValueError):
            rf.openat_beneath(dirfd, "inside", os.O_RDONLY | 0x40000000)
    finally:
        os.close(dirfd)


@freebsd_only
def test_freebsd_directory_grant_in_capability_mode(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "inside").write_text("inside")
    (tmp_path / "x").write_text("outside")

    def child() -> str:
        dirfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        granted = Rights.LOOKUP | Rights.READ | Rights.FSTAT
        _capsicum.limit_fd(dirfd, granted)
        _capsicum.enter_capability_mode()
        fd = os.open("inside", os.O_RDONLY, dir_fd=dirfd)
        assert os.read(fd, 100) == b"inside"
        assert _capsicum.get_rights(fd) == granted  # a file opened beneath inherits the grant
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.open("../x", os.O_RDONLY, dir_fd=dirfd))
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.open(str(tmp_path / "x"), os.O_RDONLY, dir_fd=dirfd))
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.open("inside", os.O_RDWR, dir_fd=dirfd))
        _expect_errno(_capsicum.ENOTCAPABLE, lambda: os.open("new", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=dirfd))
        return "ok"

    assert run_in_child(child) == "ok"


# -- helpers -----------------------------------------------------------------


def _or(values: Iterable[int]) -> int:
    out = 0
    for v in values:
        out |= v
    return out


def _or_rights(members: list[Rights]) -> Rights:
    out = Rights.NONE
    for m in members:
        out |= m
    return out
