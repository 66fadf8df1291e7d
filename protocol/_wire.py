"""Framing: one msgpack message per SOCK_SEQPACKET packet, fds as SCM_RIGHTS.

Bounds (packet size, fd count, nesting depth, integer width, blob size) are
checked on every packet received. Any breach raises :class:`ProtocolError`
after closing every fd that came with the packet; the caller then drops the
connection. Nothing here unpickles or evaluates anything.

File descriptors travel as ``ExtType(EXT_FD)`` markers that name their index
in the packet's SCM_RIGHTS array; every received fd must be named exactly
once. Byte strings too large for one packet travel in a memfd
(``ExtType(EXT_BLOB)``, at an offset) that the receiver reads once; the
blobs of one packet are bounded by ``MAX_BLOB`` in all. A sandboxed worker,
whose filter denies ``memfd_create``, writes them into the two memfds it made
before entry (``BlobRegion``), of a fixed size.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import io
import mmap
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import msgpack

from ._errors import MessageTooLarge, ProtocolError
from ._rights import Rights, rights_from_wire

# 2: large strings travel in a memfd too (EXT_TEXT); 3: cfg and out messages; 4: listings in pages, the
# stderr pipe in ready; 5: a blob is at an offset of its memfd (a worker's BlobRegion)
PROTOCOL_VERSION = 5
MAX_PACKET = 256 * 1024
INLINE_BYTES = 64 * 1024
MAX_FDS = 64
MAX_DEPTH = 32
MAX_BLOB = 64 * 1024 * 1024  # a worker can make the broker hold this much per message (all its blobs)
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1

EXT_FD = 1
EXT_BLOB = 2
EXT_DIRREF = 3  # broker -> worker only: a directory the broker resolves for it
EXT_TEXT = 4  # a large string: its UTF-8 in a memfd, as EXT_BLOB
_FD_EXT = struct.Struct("<BBQ")  # index, kind, rights
_BLOB_EXT = struct.Struct("<BQQ")  # index, offset, length
_DIRREF_EXT = struct.Struct("<IQ")  # id, rights

KIND_FILE = 0
KIND_DIR = 1
KIND_STREAM = 2  # pipe, socket or other non-seekable object
KIND_MEMFD = 3
KINDS = (KIND_FILE, KIND_DIR, KIND_STREAM, KIND_MEMFD)
_KIND_OF_TYPE = {stat.S_IFDIR: KIND_DIR, stat.S_IFREG: KIND_FILE}


_TYPE_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket", stat.S_IFCHR: "char", stat.S_IFBLK: "block",
}  # fmt: skip


def type_name(st_mode: int, unknown: str = "other") -> str:
    """What a ``stat()`` says a file is, in a word (as StatResult.type and refusals name it)."""
    return _TYPE_NAMES.get(stat.S_IFMT(st_mode), unknown)


def kind_of_mode(st_mode: int) -> int:
    """The kind an fd travels as, from its ``st_mode``: a directory, a regular
    file, or a stream (pipe, socket, anything else)."""
    return _KIND_OF_TYPE.get(stat.S_IFMT(st_mode), KIND_STREAM)

_ANCBUF = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
# Plain ints: enum arithmetic on socket flags costs a microsecond per packet.
_MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000))
_SEND_FLAGS = int(socket.MSG_DONTWAIT) | int(socket.MSG_NOSIGNAL)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_BAD_FLAGS = _MSG_CTRUNC | _MSG_TRUNC
# recv() returns None at the channel's end only: a message of nil is not that.
_NIL = "a message must be a map, not nil"
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # the peer shut its end for writing (or closed it)
_RECV_FLAGS = (_MSG_CMSG_CLOEXEC, _MSG_CMSG_CLOEXEC | _MSG_DONTWAIT)  # by nowait
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_ONE_FD = struct.Struct("i")  # the data of an SCM_RIGHTS message carrying one fd


class SocketEnd:
    """Sends a socket as one end of a channel (KIND_STREAM, READ|WRITE). The
    sender keeps its socket and closes it when it likes."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def __privsep_fd__(self) -> tuple[int, int, Rights]:
        return self._sock.fileno(), KIND_STREAM, Rights.READ | Rights.WRITE


class ReceivedFd:
    """An fd that arrived in a packet. Owns the fd until :meth:`detach`.

    ``rights`` and ``kind`` are what the *sender* claimed: a broker must not
    trust them from a worker.
    """

    __slots__ = ("fd", "kind", "rights")

    def __init__(self, fd: int, kind: int, rights: Rights):
        self.fd = fd
        self.kind = kind
        self.rights = rights

    def detach(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:
        if self.fd >= 0:  # (checked here first: most were taken over already)
            try:
                self.close()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<ReceivedFd fd={self.fd} kind={self.kind} rights={self.rights.describe()}>"


class DirRef:
    """A directory grant made after sandbox entry: no fd, an id the broker
    resolves requests against (see ``worker.Directory``)."""

    __slots__ = ("id", "rights")

    def __init__(self, id: int, rights: Rights):
        self.id = id
        self.rights = rights

    def __repr__(self) -> str:
        return f"<DirRef {self.id} {self.rights.describe()}>"


class _Blob:
    """Marker used while encoding a large byte string (or string: ``text``,
    then ``data`` is its UTF-8)."""

    __slots__ = ("data", "text")

    def __init__(self, data: bytes, text: bool = False):
        self.data = data
        self.text = text


#: Plain values that carry no fd and nothing inside: sent and received as they are.
SCALAR_TYPES = frozenset({str, bytes, int, float, bool, type(None)})
# Leaf types with nothing inside to check (received fds and directory references count).
_FLAT = frozenset({str, bytes, float, bool, type(None), ReceivedFd, DirRef})


_FLAT_OR_INT = _FLAT | {int}
_TEXT_KINDS = frozenset({str, bytes})
_CONTAINER_TYPES = (list, tuple, dict)
#: Items up to which a loop over a container costs less than taking the set of their types in C.
FEW_ITEMS = 16


def plain(items: Iterable[Any]) -> bool:
    """Are ``items`` all of SCALAR_TYPES: no fd, no reference, nothing
    inside to look at? (The set of their types, taken in C.)"""
    return set(map(type, items)) <= SCALAR_TYPES


def _ints_fit(items: Iterable[Any], kinds: set[type]) -> bool:
    """Do the ints among ``items`` (whose types are ``kinds``) fit in signed 64 bits?"""
    ints = items if len(kinds) == 1 else [x for x in items if type(x) is int]
    return min(ints) >= INT_MIN and max(ints) <= INT_MAX


def _unpacked_ints_fit(items: Iterable[Any], kinds: set[type]) -> bool:
    """``_ints_fit`` for ints msgpack unpacked, which are never below
    INT_MIN (its signed formats are 64 bits at most): only the largest can
    be too large (a uint64)."""
    return max(items if len(kinds) == 1 else [x for x in items if type(x) is int]) <= INT_MAX


def _flat(items: Collection[Any]) -> bool:
    """All leaves? A long run of items is looked at in C: the set of their
    types, then the range of their ints."""
    if len(items) > FEW_ITEMS:
        kinds = set(map(type, items))
        if kinds <= _FLAT:
            return True
        return int in kinds and kinds <= _FLAT_OR_INT and _unpacked_ints_fit(items, kinds)
    for x in items:
        t = type(x)
        if not (t in _FLAT or (t is int and INT_MIN <= x <= INT_MAX)):
            return False
    return True


def _validate(obj: Any) -> None:
    """Bound nesting depth and integer width, and allow only plain types,
    in a message msgpack unpacked. Container by container: the types of a
    long container's items are taken in C (a set of them), so a list of
    2,000 ints costs about what a few items do."""
    if type(obj) is dict:  # most messages: a map of scalars and flat containers, checked in one pass
        for k, v in obj.items():
            t = type(v)
            if type(k) is not str:
                break
            if t in _FLAT or (t is int and INT_MIN <= v <= INT_MAX):
                continue
            if t is list and (not v or _flat(v)):  # (empty first: a call's "a" and "k" mostly are)
                continue
            if t is dict and (not v or (all(type(x) is str for x in v) and _flat(v.values()))):
                continue
            break
        else:
            return
    pending: list[tuple[Collection[Any], int]] = [((obj,), 0)]  # (items, the depth at which they sit)
    while pending:
        items, depth = pending.pop()
        if not items:
            continue
        if depth > MAX_DEPTH:
            raise ProtocolError(f"message nested deeper than {MAX_DEPTH}")
        if len(items) > FEW_ITEMS:
            kinds = set(map(type, items))
            if int in kinds and not _unpacked_ints_fit(items, kinds):
                raise ProtocolError("integer wider than 64 bits")
            if kinds <= _FLAT_OR_INT:
                continue
        for x in items:
            t = type(x)
            if t in _FLAT:
                continue
            if t is int:
                if not INT_MIN <= x <= INT_MAX:
                    raise ProtocolError("integer wider than 64 bits")
            elif t is list:
                if x:  # (an empty one has nothing to look at: 262k of them cost 163 ms, 27 ms not queued)
                    pending.append((x, depth + 1))
            elif t is dict:
                if x:
                    for k in x:
                        if type(k) is not str:
                            raise ProtocolError("map keys must be strings")
                    pending.append((x.values(), depth + 1))
            else:
                raise ProtocolError(f"type {t.__name__} is not allowed on the wire")


def check_sendable(obj: Any, depth: int = 0) -> None:
    """Refuse, as the sender, what the peer's wire check would: map keys
    other than str, nesting deeper than ``MAX_DEPTH``, integers outside
    signed 64 bits, values over ``MAX_BLOB``. An honest sender hears why (``TypeError`` or
    ``ValueError``) instead of losing its peer. ``depth``: where ``obj`` sits
    in its message. Other types are leaves here: the packer takes or refuses
    them. A long container of plain values only (str, bytes, int, float,
    bool, None) is checked in C: the set of their types, the range of the
    ints, the longest str or bytes."""
    stack: list[tuple[Any, int]] = [(obj, depth)]
    while stack:
        item, d = stack.pop()
        if d > MAX_DEPTH:
            raise ValueError(f"nested deeper than the wire allows ({MAX_DEPTH} levels)")
        if isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                raise ValueError("an integer outside signed 64 bits cannot be sent")
        elif isinstance(item, _CONTAINER_TYPES):
            values: Collection[Any] = item
            if isinstance(item, dict):
                for k in item:
                    if type(k) is not str:
                        raise TypeError(f"map keys must be str, not {type(k).__name__}")
                values = item.values()
            d += 1
            if d > MAX_DEPTH:
                stack.extend((x, d) for x in values)  # (refused below, the way that says why)
                continue
            if type(item) in _CONTAINER_TYPES and len(values) > FEW_ITEMS:  # (a subclass: its own len, never run)
                kinds = set(map(type, values))
                if kinds <= SCALAR_TYPES and _plain_fits(values, kinds):
                    continue
            for x in values:
                t = type(x)
                if t is str or t is bytes:
                    if len(x) <= CHECK_BLOB_LEN:
                        continue
                elif t is int:
                    if INT_MIN <= x <= INT_MAX:
                        continue
                elif t is float or t is bool or x is None:
                    continue
                stack.append((x, d))
        elif (isinstance(item, (str, bytes, bytearray)) and len(item) > CHECK_BLOB_LEN) or isinstance(item, memoryview):
            check_blob_size(item)


def check_plain(obj: list[Any] | tuple[Any, ...] | dict[Any, Any], depth: int) -> bool:
    """For a container about to be sent (``depth``: where it sits in its
    message): if it holds plain values only (of SCALAR_TYPES: nothing to
    turn into what travels), check it as ``check_sendable`` does, raising
    the same way, and return True. Else return False, nothing checked."""
    if type(obj) not in _CONTAINER_TYPES:
        return False  # (a subclass: item by item, as before)
    items = obj.values() if type(obj) is dict else obj
    kinds = set(map(type, items))
    if not kinds <= SCALAR_TYPES:
        return False
    if isinstance(obj, dict) or depth >= MAX_DEPTH or not _plain_fits(items, kinds):
        check_sendable(obj, depth)  # (its keys; or what is wrong, said)
    return True


def _plain_fits(items: Iterable[Any], kinds: set[type]) -> bool:
    """Do plain items (of ``kinds``, all in SCALAR_TYPES) need no further
    check: ints within signed 64 bits, no str or bytes long enough to be
    measured against MAX_BLOB?"""
    if int in kinds and not _ints_fit(items, kinds):
        return False
    return not kinds & _TEXT_KINDS or _longest(items, kinds) <= CHECK_BLOB_LEN


def _longest(items: Iterable[Any], kinds: set[type]) -> int:
    """The length of the longest str or bytes among ``items`` (whose types are ``kinds``)."""
    if kinds <= _TEXT_KINDS:
        return max(map(len, items))
    return max((len(x) for x in items if type(x) is str or type(x) is bytes), default=0)


#: Byte strings and strings longer than this are measured against ``MAX_BLOB``
#: before they are packed (shorter ones cannot exceed it).
CHECK_BLOB_LEN = MAX_BLOB // 4


def check_blob_size(obj: Any) -> None:
    """Refuse a byte string or string too large for one blob with
    :class:`MessageTooLarge`, before packing copies it (which for a value of
    a gigabyte takes seconds, and may exhaust a worker's address space)."""
    if isinstance(obj, str):
        if len(obj) > CHECK_BLOB_LEN:
            _refuse_blob(len(obj.encode("utf-8", "surrogatepass")), text=True)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _refuse_blob(obj.nbytes if isinstance(obj, memoryview) else len(obj), text=False)


def _refuse_blob(size: int, *, text: bool) -> None:
    if size > MAX_BLOB:
        what = f"a string of {size} UTF-8 bytes" if text else f"a {size}-byte value"
        raise MessageTooLarge(f"{what} exceeds the {MAX_BLOB}-byte limit; pass a file instead")


def _read_blob(fd: int, offset: int, length: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("blob fd is not a regular file")
    if length > MAX_BLOB or st.st_size < offset + length:
        raise ProtocolError("blob length out of bounds")
    # One read into the bytes returned (no second copy): a regular file reads
    # short only at its end, which a sender that shrank its memfd has moved.
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:  # (a file open for writing only: EBADF)
        raise ProtocolError(f"blob fd cannot be read: {exc.strerror}") from exc
    if len(data) != length:
        raise ProtocolError("blob shorter than announced")
    return data


class BlobRegion:
    """A process's two memfds for the large values it sends, made before its
    sandbox entry: the filter then denies ``memfd_create``, which let a
    worker hold memory outside its address space (RLIMIT_AS) without bound
    (a red-team worker held 8 GiB of memfds, RSS 26 MiB). Each is sealed at
    ``MAX_BLOB`` bytes, so together they can never hold more than twice
    that; pages are allocated only as values are written. Each message that
    carries values writes them into the memfd the previous one did not use:
    the receiver reads a message's values as it receives it, and every
    message that may carry them ends a call (or the worker), so the one
    before is read by then."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        try:
            for _ in range(2):
                self.fds.append(_sealed_memfd(MAX_BLOB))
        except BaseException:
            for fd in self.fds:
                os.close(fd)
            raise
        self._turn = 1

    def next_fd(self) -> int:
        """The memfd the next message's values go into (from offset 0)."""
        self._turn ^= 1
        return self.fds[self._turn]


_SEALED = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _sealed_memfd(size: int) -> int:
    fd = os.memfd_create("privsep-blobs", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


_region: BlobRegion | None = None


def use_blob_region() -> BlobRegion:
    """From now on, this process's large values go into its ``BlobRegion``
    (made now: call it before a filter that denies ``memfd_create``)."""
    global _region
    if _region is None:
        _region = BlobRegion()
    return _region


def _make_blob_fd(data: bytes) -> int:
    """A memfd holding ``data``, sealed against any change: the receiver
    (a worker, from the broker) gets it read-write, and could otherwise keep
    it and grow it with ``ftruncate`` into memory outside its RLIMIT_AS and
    its RSS (a red-team worker held 4 GiB so, RSS 21 MiB)."""
    fd = os.memfd_create("privsep-blob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALED)
        return fd
    except BaseException:
        os.close(fd)
        raise


class _Encoder:
    """Packs messages that carry fds or blobs. One per thread (``_encoders``):
    a Packer built once saves about half a microsecond per message, and its
    ``default`` runs Python code, so threads must not share it."""

    __slots__ = ("busy", "fd_hook", "fds", "owned", "packer", "region_at", "region_fd")

    def __init__(self) -> None:
        self.busy = False
        self.fds: list[int] = []
        self.owned: list[int] = []
        self.region_fd = -1  # this message's memfd of the BlobRegion (-1: none taken yet)
        self.region_at = 0  # where its next value goes in it
        self.fd_hook: Callable[[Any], tuple[int, int, Rights]] | None = None
        self.packer = msgpack.Packer(default=self.default, use_bin_type=True, autoreset=True)

    def default(self, o: Any) -> Any:
        fds = self.fds
        hook = getattr(o, "__privsep_fd__", None)
        if hook is not None:
            fd, kind, rights = hook()
        elif type(o) is _Blob:
            if len(fds) >= MAX_FDS:
                raise MessageTooLarge(f"more than {MAX_FDS} fds in one message")
            region = _region
            if region is None:
                fd, offset = _make_blob_fd(o.data), 0
                self.owned.append(fd)
            else:  # (_outline kept this message's values within MAX_BLOB: they fit one memfd)
                if self.region_fd < 0:
                    self.region_fd, self.region_at = region.next_fd(), 0
                fd, offset = self.region_fd, self.region_at
                _pwrite_all(fd, o.data, offset)
                self.region_at += len(o.data)
            fds.append(fd)
            return msgpack.ExtType(EXT_TEXT if o.text else EXT_BLOB,
                                   _BLOB_EXT.pack(len(fds) - 1, offset, len(o.data)))
        elif type(o) is DirRef:
            return msgpack.ExtType(EXT_DIRREF, _DIRREF_EXT.pack(o.id, int(o.rights)))
        elif self.fd_hook is not None:
            fd, kind, rights = self.fd_hook(o)
        elif isinstance(o, (io.BytesIO, io.StringIO)):
            raise TypeError(
                f"cannot send a {type(o).__name__} to the other side: it is no file descriptor (send its "
                "contents, getvalue(), instead)"
            )
        elif hasattr(o, "fileno"):  # a file or socket of the broker's: its rights would be implicit
            raise TypeError(
                f"cannot send a {type(o).__name__} to the other side: pass a capability, whose rights are "
                "explicit (broker.open(path, rights))"
            )
        else:
            raise unsendable(o, "the other side")
        if fd < 0:
            raise ValueError("cannot send a closed file descriptor")
        if len(fds) >= MAX_FDS:
            raise MessageTooLarge(f"more than {MAX_FDS} fds in one message")
        fds.append(fd)
        return fd_marker(len(fds) - 1, kind, int(rights))

    def pack(self, obj: Any) -> bytes:
        """Pack ``obj``; on failure close the blob fds made for it."""
        try:
            return self.packer.pack(obj)
        except BaseException:
            self.packer.reset()  # a failed pack may leave bytes in the buffer
            self.drop()
            raise

    def drop(self) -> None:
        for fd in self.owned:
            os.close(fd)
        self.fds = []
        self.owned = []
        self.region_fd = -1


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_encoders = threading.local()
_markers: dict[tuple[int, int, int], msgpack.ExtType] = {}


# Linux 4.14+ (asm-generic mman-common.h: 18 on every architecture); Python 3.11's mmap lacks the name.
_WIPEONFORK: int | None = getattr(mmap, "MADV_WIPEONFORK", 18 if sys.platform == "linux" else None)


def unsendable(obj: object, to: str) -> TypeError:
    """Why ``obj`` cannot travel, saying what can."""
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return TypeError(
        f"cannot send {article} {name} to {to}: only None, bool, int, float, str, bytes, lists, tuples, "
        "dicts with str keys, files and directories travel (a dataclass or a named tuple: send its fields)"
    )


def fd_marker(index: int, kind: int, rights: int) -> msgpack.ExtType:
    """What names fd ``index`` of a packet in its message (kind, the sender's
    rights claim). Made once per distinct value: building an ExtType costs more
    than finding it."""
    key = (index, kind, rights)
    marker = _markers.get(key)
    if marker is None:
        marker = msgpack.ExtType(EXT_FD, _FD_EXT.pack(index, kind, rights))
        if len(_markers) < 1024:
            _markers[key] = marker
    return marker


def encode(
    obj: Any, fd_hook: Callable[[Any], tuple[int, int, Rights]] | None = None
) -> tuple[bytes, list[int], list[int]]:
    """Encode ``obj``. Returns (payload, fds to send, fds to close after sending).

    Objects with ``__privsep_fd__`` travel as fds; ``fd_hook`` may describe
    other objects (the worker uses it for plain file objects).
    """
    enc: _Encoder | None = getattr(_encoders, "enc", None)
    if enc is None:
        enc = _encoders.enc = _Encoder()
    elif enc.busy:  # called from a hook while packing another message: not that message's state
        enc = _Encoder()
    enc.busy = True
    enc.fd_hook = fd_hook
    enc.fds = []
    enc.owned = []
    enc.region_fd = -1
    try:
        payload = enc.pack(obj)
        if len(payload) > MAX_PACKET:
            enc.drop()
            payload = enc.pack(_outline(obj))
            if len(payload) > MAX_PACKET:
                enc.drop()
                raise MessageTooLarge(f"message of {len(payload)} bytes exceeds {MAX_PACKET} even with blobs")
        return payload, enc.fds, enc.owned
    finally:
        enc.busy = False
        enc.fd_hook = None
        enc.fds = []
        enc.owned = []
        enc.region_fd = -1


def _outline(obj: Any) -> Any:
    """Copy ``obj`` with large byte strings and strings replaced by blob
    markers. The blobs of one message hold at most ``MAX_BLOB`` bytes in all:
    the receiver refuses more."""
    left = [MAX_BLOB]

    def blob(data: bytes, text: bool) -> _Blob:
        left[0] -= len(data)
        if left[0] < 0:
            raise MessageTooLarge(f"the large values of one message exceed {MAX_BLOB} bytes in all; pass files")
        return _Blob(data, text)

    def walk(obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray, memoryview)) and len(obj) > INLINE_BYTES:
            check_blob_size(obj)
            return blob(bytes(obj), False)
        if isinstance(obj, str) and len(obj) > INLINE_BYTES // 4:  # (up to 4 bytes a character)
            data = obj.encode()  # (a string msgpack cannot pack either, lone surrogates, raises here)
            _refuse_blob(len(data), text=True)
            return blob(data, True) if len(data) > INLINE_BYTES else obj
        if isinstance(obj, (list, tuple)):
            return [walk(x) for x in obj]
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        return obj

    return walk(obj)


class _LaterBlob:
    """A blob named in a packet, read only once the message's tag allows one."""

    __slots__ = ("index", "length", "offset", "text")

    def __init__(self, index: int, offset: int, length: int, text: bool):
        self.index, self.offset, self.length, self.text = index, offset, length, text


def _read_later(blob: _LaterBlob, fds: list[int]) -> bytes | str:
    data = _read_blob(fds[blob.index], blob.offset, blob.length)
    if not blob.text:
        return data
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("text blob is not UTF-8") from exc


def _read_blobs(obj: Any, fds: list[int]) -> Any:
    """``obj`` with each _LaterBlob in it read (in place, depth-bounded)."""
    if type(obj) is _LaterBlob:
        return _read_later(obj, fds)
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError(f"message nested deeper than {MAX_DEPTH}")
        pairs = enumerate(item) if type(item) is list else item.items() if type(item) is dict else ()
        for key, value in list(pairs):
            if type(value) is _LaterBlob:
                item[key] = _read_later(value, fds)
            elif type(value) is list or type(value) is dict:
                stack.append((value, depth + 1))
    return obj


class Deferred:
    """A received message whose blobs are still to be read: up to
    ``MAX_BLOB`` bytes to copy, and to decode as UTF-8 for text (60 MiB took
    60-110 ms). ``finish()`` reads them and checks the whole message, on
    whatever thread the receiver chooses; ``discard()`` lets it go unread.
    Owns the packet's fds until one of them has run (each runs once)."""

    __slots__ = ("_fds", "_got", "_obj")

    def __init__(self, obj: Any, fds: list[int], got: list[Any]):
        self._obj, self._got = obj, got
        self._fds: list[int] | None = fds  # None once finished or discarded

    def finish(self) -> Any:
        """The message, as ``decode()`` would have returned it (or its error)."""
        fds, self._fds = self._fds, None
        if fds is None:
            raise RuntimeError("this message was finished or discarded already")
        obj, self._obj = self._obj, None
        return _finish(obj, fds, self._got, True)

    def discard(self) -> None:
        """Close its fds unread (nothing, once finished or discarded)."""
        fds, self._fds = self._fds, None
        if fds is not None:
            _drop(fds, self._got)

    def __del__(self) -> None:
        self.discard()


def _drop(fds: list[int], got: list[Any]) -> None:
    """Close every fd of a packet that failed (or is let go) once decoded in part."""
    for rfd in got:
        if type(rfd) is ReceivedFd:
            rfd.detach()  # closed below, once
    for fd in fds:
        os.close(fd)


def _finish(obj: Any, fds: list[int], got: list[Any], blobs: bool) -> Any:
    """The rest of ``decode``: read the blobs named in ``obj``, check it,
    close the fds that carried blobs."""
    try:
        if blobs:
            obj = _read_blobs(obj, fds)
        _validate(obj)
    except BaseException:
        _drop(fds, got)
        raise
    if _BLOB in got:
        for index, what in enumerate(got):
            if what is _BLOB:
                os.close(fds[index])
    return obj


def decode(
    payload: bytes | memoryview,
    fds: list[int],
    *,
    allow_dirref: bool = False,
    blob_tags: frozenset[str] | None = None,
    defer: bool = False,
) -> Any:
    """Decode one packet. Takes ownership of ``fds``: each one is either
    returned inside the message as a :class:`ReceivedFd` or closed.
    Directory references are accepted only where ``allow_dirref`` (from the
    broker). ``blob_tags``: the message tags that may carry blobs (None:
    any); a blob is read only once the tag is known to allow it, so a
    request that may carry none costs no read of 64 MiB before its refusal.
    ``defer`` (with ``blob_tags``): a message with blobs is returned as a
    :class:`Deferred`, its blobs unread."""
    later = blob_tags is not None
    if not fds:
        obj = _unpack(payload, _dirref_hook if allow_dirref else _no_ext_hook)
        _validate(obj)
        return obj
    count = len(fds)
    # What each fd became: a ReceivedFd (which then owns it), or _BLOB (read, then closed here).
    got: list[Any] = [None] * count
    blob_room = [MAX_BLOB]  # for all the blobs of this packet: 64 of MAX_BLOB each would be 4 GiB

    def ext_hook(code: int, data: bytes) -> Any:
        if code == EXT_FD and len(data) == _FD_EXT_SIZE:
            index, kind, rights = _FD_EXT_UNPACK(data)
            if index >= count or got[index] is not None:
                raise ProtocolError("fd reference out of range or repeated")
            if kind not in KINDS:
                raise ProtocolError("unknown fd kind")
            rfd = got[index] = ReceivedFd(fds[index], kind, rights_from_wire(rights))
            return rfd
        if code in (EXT_BLOB, EXT_TEXT) and len(data) == _BLOB_EXT.size:
            index, offset, length = _BLOB_EXT.unpack(data)
            if index >= count or got[index] is not None:
                raise ProtocolError("blob reference out of range or repeated")
            got[index] = _BLOB
            blob_room[0] -= length
            if blob_room[0] < 0:
                raise ProtocolError(f"the blobs of one packet exceed {MAX_BLOB} bytes in all")
            if later:
                return _LaterBlob(index, offset, length, code == EXT_TEXT)
            blob = _read_blob(fds[index], offset, length)
            if code == EXT_BLOB:
                return blob
            try:
                return blob.decode()
            except UnicodeDecodeError as exc:
                raise ProtocolError("text blob is not UTF-8") from exc
        if code == EXT_DIRREF and allow_dirref and len(data) == _DIRREF_EXT.size:
            ident, rights = _DIRREF_EXT.unpack(data)
            return DirRef(ident, rights_from_wire(rights))
        raise ProtocolError(f"unknown extension type {code}")

    try:
        obj = _unpack(payload, ext_hook)
        if None in got:
            raise ProtocolError("packet carried fds that the message does not name")
        blobs = later and _BLOB in got
        if blobs:
            tag = obj.get("t") if type(obj) is dict else None
            if blob_tags is not None and tag not in blob_tags:
                raise ProtocolError(f"a {tag!r} message carries no out-of-band value")
    except BaseException:
        _drop(fds, got)
        raise
    if blobs and defer:
        return Deferred(obj, fds, got)
    return _finish(obj, fds, got, blobs)


class _NotOneFd(Exception):
    """A packet with one fd that is not named once as a plain fd: decode() takes it."""


def _decode_one_fd(
    payload: memoryview, fd: int, allow_dirref: bool, blob_tags: frozenset[str] | None = None, defer: bool = False
) -> Any:
    """decode() for the commonest packet with an fd: exactly one, named once
    as a file descriptor (a file passed, returned, or granted). Takes
    ownership of ``fd``; any other shape goes to decode(), which then owns it."""
    rfd: ReceivedFd | None = None

    def ext_hook(code: int, data: bytes) -> Any:
        nonlocal rfd
        if code == EXT_FD and rfd is None and len(data) == _FD_EXT_SIZE:
            index, kind, rights = _FD_EXT_UNPACK(data)
            if index == 0 and kind in KINDS:
                rfd = ReceivedFd(fd, kind, rights_from_wire(rights))
                return rfd
        raise _NotOneFd

    try:
        obj = _unpack(payload, ext_hook)
        if rfd is None:
            raise ProtocolError("packet carried fds that the message does not name")
        _validate(obj)
        return obj
    except _NotOneFd:
        if rfd is not None:
            rfd.detach()  # decode() closes or wraps the fd itself
        return decode(payload, [fd], allow_dirref=allow_dirref, blob_tags=blob_tags, defer=defer)
    except BaseException:
        if rfd is not None:
            rfd.detach()  # closed below, once
        os.close(fd)
        raise


def _out_of_fds() -> bool:
    """Is this process at its fd limit? (A pipe needs two free slots.)"""
    try:
        r, w = os.pipe()
    except OSError as exc:
        return exc.errno == errno.EMFILE
    os.close(r)
    os.close(w)
    return False


_BLOB = object()  # marks an fd that carried a blob
_FD_EXT_SIZE = _FD_EXT.size
_FD_EXT_UNPACK = _FD_EXT.unpack


_packb = msgpack.packb
_unpackb = msgpack.unpackb
# One Packer for plain data (no default hook): pack() runs in C without releasing the GIL, so
# threads may share it; it saves building a Packer per message.
_plain_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


_MALFORMED = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, RecursionError)


def _unpack(payload: bytes | memoryview, ext_hook: Callable[[int, bytes], Any]) -> Any:
    """One msgpack object, strictly: UTF-8 strings, str keys, nothing extra."""
    try:
        return _unpackb(payload, raw=False, use_list=True, strict_map_key=True, ext_hook=ext_hook)
    except ProtocolError:
        raise
    except _MALFORMED as exc:
        raise ProtocolError(f"malformed packet: {exc.__class__.__name__}: {exc}") from exc


def _no_ext_hook(code: int, data: bytes) -> Any:
    if code in (EXT_FD, EXT_BLOB, EXT_TEXT):
        raise ProtocolError("fd reference out of range or repeated")
    raise ProtocolError(f"unknown extension type {code}")


def _dirref_hook(code: int, data: bytes) -> Any:
    if code == EXT_DIRREF and len(data) == _DIRREF_EXT.size:
        ident, rights = _DIRREF_EXT.unpack(data)
        return DirRef(ident, rights_from_wire(rights))
    return _no_ext_hook(code, data)


DEFAULT_SEND_TIMEOUT = 10.0  # seconds a send may wait for a peer that stopped reading


# A SEQPACKET send fails with EMSGSIZE past the sender's buffer (sk_sndbuf - 32), which is
# net.core.wmem_default (212,992 bytes) unless set: packets between that and MAX_PACKET failed, a
# call's argument ending the worker it was sent to (a user trial). Both ends get room for one.
_SNDBUF = MAX_PACKET + 4096
_SO_SNDBUFFORCE = 32  # (socket(7); not in Python's socket module)


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """A channel's socket pair, each end able to send a MAX_PACKET packet:
    SO_SNDBUF (the kernel doubles it, up to net.core.wmem_max), else
    SO_SNDBUFFORCE (privileged), else as it is (a larger send raises
    MessageTooLarge, see Channel.send_raw)."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in pair:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < MAX_PACKET + 64:
            with contextlib.suppress(OSError):  # (no CAP_NET_ADMIN: what wmem_max allows)
                sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _SNDBUF)
    return pair


def _emsgsize(exc: OSError, size: int) -> None:
    """EMSGSIZE (a socket made elsewhere, or a buffer no larger than
    wmem_max allows) raised as what it is: nothing was sent."""
    if exc.errno == errno.EMSGSIZE:
        raise MessageTooLarge(f"a packet of {size:,} bytes is larger than this socket can send") from exc


class Channel:
    """One end of a SOCK_SEQPACKET connection. Owns its socket.

    ``send`` never blocks for longer than ``send_timeout`` on a peer that
    stops reading; ``recv`` enforces every bound above.
    """

    def __init__(
        self, sock: socket.socket, *, send_timeout: float | None = DEFAULT_SEND_TIMEOUT, allow_dirref: bool = False
    ):
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            raise ValueError("a Channel needs an AF_UNIX SOCK_SEQPACKET socket")
        self.sock = sock
        self.send_timeout = send_timeout
        # A time.monotonic() by which a send that waits for room gives up, whatever
        # send_timeout says (the deadline of the call it answers); None: none.
        self.send_deadline: float | None = None
        self.allow_dirref = allow_dirref
        # The message tags that may carry out-of-band values (blobs); None: any.
        self.blob_tags: frozenset[str] | None = None
        # Anonymous mmap: pages are faulted in only as packets reach them, so
        # a fresh worker does not pay for zero-filling 256 KiB. PRIVATE, never
        # Python's default MAP_SHARED: a shared one stays shared across fork(),
        # and every worker the zygote forked could read, and rewrite, what the
        # broker sent the zygote (a worker made it run code of its own). Wiped
        # on fork: a child does not even see the last message.
        self._buf = mmap.mmap(-1, MAX_PACKET + 1, flags=mmap.MAP_PRIVATE)
        if _WIPEONFORK is not None:
            with contextlib.suppress(OSError):  # (an older kernel: private is what matters)
                self._buf.madvise(_WIPEONFORK)
        self._view = memoryview(self._buf)

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = seqpacket_pair()
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        try:
            self._view.release()
            self._buf.close()
        except BufferError:
            pass  # a decoded packet still views the buffer; it is freed with it
        self._view = memoryview(bytearray(0))  # a receive now fails as on any closed socket (EBADF)

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def send(
        self, obj: Any, fd_hook: Callable[[Any], tuple[int, int, Rights]] | None = None, *, with_fds: bool = False
    ) -> None:
        """Send one message. ``with_fds``: the caller knows it carries fds
        (skips the attempt to pack it as plain data)."""
        if not with_fds:  # fast path: plain data that fits one packet, sent without ancillary data
            try:
                plain = _plain_packer.pack(obj)
            except TypeError:  # something that travels as an fd (or cannot travel at all)
                plain = None
            if plain is not None and len(plain) <= MAX_PACKET:
                try:
                    self.sock.send(plain, _SEND_FLAGS)
                except (BlockingIOError, InterruptedError):
                    self.send_raw(plain)  # waits for room, at most send_timeout
                except OSError as exc:
                    _emsgsize(exc, len(plain))
                    raise
                return
        payload, fds, owned = encode(obj, fd_hook)
        try:
            self.send_raw(payload, fds)
        finally:
            for fd in owned:
                os.close(fd)

    def try_send(self, obj: Any) -> bool:
        """Send one plain message if the peer's queue has room now; never wait.
        False if it had none (or the peer is gone). For a courtesy such as
        "stop": a worker that keeps its queue full must not hold the broker."""
        try:
            self.sock.send(_plain_packer.pack(obj), _SEND_FLAGS)
            return True
        except OSError:  # (BlockingIOError: full; EPIPE/ECONNRESET: gone; EBADF: closed)
            return False

    def send_one_fd(self, obj: Any, fd: int) -> None:
        """Send a message that carries exactly one fd, already named in it by
        ``fd_marker(0, ...)`` (the caller knows where it is: no walk for fds)."""
        if fd < 0:
            raise ValueError("cannot send a closed file descriptor")
        payload = _plain_packer.pack(obj)
        if len(payload) > MAX_PACKET:
            raise MessageTooLarge(f"message of {len(payload)} bytes exceeds {MAX_PACKET}")
        try:
            self.sock.sendmsg([payload], [(_SOL_SOCKET, _SCM_RIGHTS, _ONE_FD.pack(fd))], _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            self.send_raw(payload, (fd,))  # waits for room, at most send_timeout
        except OSError as exc:
            _emsgsize(exc, len(payload))
            raise

    def send_raw(self, payload: bytes, fds: Iterable[int] = ()) -> None:
        """Send one packet as is (tests use this to play a hostile peer)."""
        fd_list = list(fds)
        anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fd_list))] if fd_list else []
        try:
            self.sock.sendmsg([payload], anc, _SEND_FLAGS)
            return
        except BlockingIOError:
            pass
        except InterruptedError:
            pass
        except OSError as exc:
            _emsgsize(exc, len(payload))
            raise
        # The peer is not reading: wait for room, at most send_timeout (and never past send_deadline).
        deadline = None if self.send_timeout is None else time.monotonic() + self.send_timeout
        if self.send_deadline is not None and (deadline is None or self.send_deadline < deadline):
            deadline = self.send_deadline
        while True:
            try:
                self.sock.sendmsg([payload], anc, _SEND_FLAGS)
                return
            except BlockingIOError:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ProtocolError("peer stopped reading; send timed out") from None
                poller = select.poll()
                poller.register(self.sock, select.POLLOUT)
                poller.poll(None if remaining is None else max(1, int(remaining * 1000)))
            except InterruptedError:
                continue

    def recv_raw(self, nowait: bool = False) -> tuple[memoryview, list[int]] | None:
        """Receive one packet. None on EOF. Takes care of every bound but the
        message content; the fds returned are owned by the caller. With
        ``nowait``, raises BlockingIOError if no packet is waiting."""
        return self._checked(*self._recvmsg(nowait))

    def _recvmsg(self, nowait: bool) -> tuple[int, list[tuple[int, int, bytes]], int]:
        while True:
            try:
                n, anc, flags, _ = self.sock.recvmsg_into([self._view], _ANCBUF, _RECV_FLAGS[nowait])
                return n, anc, flags
            except InterruptedError:
                continue

    def _checked(self, n: int, anc: list[tuple[int, int, bytes]], flags: int) -> tuple[memoryview, list[int]] | None:
        """Apply the packet bounds to what recvmsg returned; take the fds."""
        fds: list[int] = []
        bad: str | None = None
        for level, kind, data in anc or ():
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                arr = array.array("i")
                usable = len(data) - len(data) % arr.itemsize
                arr.frombytes(data[:usable])
                fds.extend(arr)
            else:
                bad = "unexpected control message"
        if flags & _MSG_CTRUNC:
            if _out_of_fds():  # the kernel dropped fds it could not install here: our limit, not the peer
                for fd in fds:
                    os.close(fd)
                raise OSError(errno.EMFILE, "too many open files in this process: fds sent to it were dropped")
            bad = "control data truncated (too many fds)"
        elif flags & _MSG_TRUNC or n > MAX_PACKET:
            bad = f"packet larger than {MAX_PACKET} bytes"
        elif len(fds) > MAX_FDS:
            bad = f"more than {MAX_FDS} fds in one packet"
        if bad is not None:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(bad)
        if n == 0 and not fds:
            if self._peer_connected():
                raise ProtocolError("empty packet")
            return None
        return self._view[:n], fds

    def _peer_connected(self) -> bool:
        """After a read of 0 bytes: was it an empty packet, sent by a peer
        still connected, or the end of the channel? (SEQPACKET reads both as
        0; only the end leaves the socket hung up.)"""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | _POLLRDHUP)
        return not any(ev & (select.POLLHUP | _POLLRDHUP) for _, ev in poller.poll(0))

    def recv(self, nowait: bool = False, defer_blobs: bool = False) -> Any:
        """Receive and decode one message. Returns None on EOF. With
        ``nowait``, raises BlockingIOError if no packet is waiting. With
        ``defer_blobs`` (a channel with ``blob_tags``), a message carrying
        blobs comes as a :class:`Deferred`, to be finished elsewhere."""
        # (PEP 475: the call is retried after a signal, InterruptedError is not seen here)
        n, anc, flags, _ = self.sock.recvmsg_into([self._view], _ANCBUF, _RECV_FLAGS[nowait])
        if not flags & _BAD_FLAGS and 0 < n <= MAX_PACKET:
            if not anc:  # fast path: a packet without fds
                obj = _unpack(self._view[:n], _dirref_hook if self.allow_dirref else _no_ext_hook)
                if obj is None:
                    raise ProtocolError(_NIL)
                _validate(obj)
                return obj
            if len(anc) == 1:  # fast path: exactly one fd
                level, kind, data = anc[0]
                if level == _SOL_SOCKET and kind == _SCM_RIGHTS and len(data) == _ONE_FD.size:
                    return _decode_one_fd(self._view[:n], _ONE_FD.unpack(data)[0], self.allow_dirref, self.blob_tags,
                                          defer_blobs)
        got = self._checked(n, anc, flags)
        if got is None:
            return None
        payload, fds = got
        obj = decode(payload, fds, allow_dirref=self.allow_dirref, blob_tags=self.blob_tags, defer=defer_blobs)
        if obj is None:
            raise ProtocolError(_NIL)
        return obj

    def peek(self) -> Any:
        """The next message, decoded but left queued with its fds (None if
        none is waiting, or if it cannot be read as a message): its fd
        references come as ``msgpack.ExtType``. A peek with no room for
        control data installs no fd (the kernel drops its copies)."""
        try:
            data = self.sock.recv(MAX_PACKET + 1, socket.MSG_PEEK | _MSG_DONTWAIT)
        except OSError:  # (nothing waiting, a signal, a channel closed or broken: nothing to see)
            return None
        if not data or len(data) > MAX_PACKET:
            return None
        try:
            return _unpackb(data, raw=False, use_list=True, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException):
            return None

    def wait_readable(self, timeout: float | None) -> bool:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))
