"""The sandboxed half of the unpacker: it parses the archive, the broker decides.

The worker holds the archive (a read-only grant, the only file its policy
lets it open) and walks it one member at
a time. It reports each member's raw name and type to the broker, which
checks them; for a member the broker accepts, the broker names the output
path and the worker streams the data into ``self.broker.create(path)``,
counting the bytes as they come out of the decompressor. Each member is its
own call, so each output is committed (renamed into place) only when its
data was complete and within the limits; a member cut short by a bomb limit,
a CRC error or a crash leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import stat
from typing import IO, Any, cast

from protocol import Rights
from worker import Worker, rpc

from .safety import BOMB, CORRUPT, NOT_ARCHIVE, Budget, Limits, Refused

CHUNK = 64 * 1024
OUTPUT_RIGHTS = Rights.WRITE | Rights.SEEK | Rights.FSTAT


class CountingReader:
    """A seekable reader that counts the bytes the parser actually took (compressed input consumed).

    It sits *above* the buffer, so read-ahead does not count: the count
    moves only as zipfile/gzip/bz2/lzma pull input for what they produce.
    """

    def __init__(self, raw: IO[bytes]):
        self._f: Any = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(cast(Any, raw), CHUNK)
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        return data

    def read1(self, n: int = -1) -> bytes:
        data = self._f.read1(n)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self.count += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._f.closed

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._f.close()


class Unpacker(Worker):
    """One archive per worker: ``open_archive``, then ``next_member`` / ``extract_member`` in turn."""

    #: setup() only imports and warms modules in this process: the zygote may
    #: make the worker (and enter its sandbox) before it is asked for.
    setup_ahead = True

    def setup(self) -> None:
        # The archive modules import their codecs lazily; do it now, before the sandbox.
        import bz2  # noqa: F401
        import codecs
        import gzip  # noqa: F401
        import lzma  # noqa: F401
        import tarfile
        import zipfile
        import zlib  # noqa: F401

        for name in ("cp437", "utf-8", "ascii", "latin-1"):
            codecs.lookup(name)
        _warm_up(tarfile, zipfile)
        self._zip: Any = None
        self._tar: Any = None
        self._infos: list[Any] = []
        self._index = -1
        self._current: Any = None
        self._reader: CountingReader | None = None
        self._size = 0
        #: the compressed bytes read before the current tar member's header: its own are counted
        #: from there (reading the header pulled a block of compressed input, which may hold all
        #: of the member's data: counted from after it, a 4 MiB member read "from 0 B compressed")
        self._member_start = 0

    @rpc
    def open_archive(self, path: str) -> dict[str, Any]:
        """Ask the broker for the archive (read-only) and recognise the format (zip, or tar with any compression).

        The worker opens it itself, through ``self.broker.open``, because a file
        it requested stays open across calls, while a file passed as a call
        argument is closed when that call returns. The policy grants this one
        file and nothing else to read.
        """
        import tarfile
        import zipfile

        src = self.broker.open(path, Rights.READ | Rights.FSTAT | Rights.SEEK)
        self._size = os.fstat(src.fileno()).st_size
        if self._size == 0:
            raise ValueError(f"{NOT_ARCHIVE}: the file is empty")
        head = src.read(16)
        src.seek(0)
        reader = self._reader = CountingReader(src)
        try:
            if zipfile.is_zipfile(reader):
                reader.seek(0)
                self._zip = zipfile.ZipFile(cast(Any, reader))
                self._infos = self._zip.infolist()
                return {"format": "zip", "size": self._size, "members": len(self._infos)}
            reader.seek(0)
            self._member_start = reader.count  # (opening it reads the first member's header)
            self._tar = tarfile.open(fileobj=cast(Any, reader), mode="r:*")  # noqa: SIM115 (kept across calls)
            return {"format": _tar_format(self._tar), "size": self._size, "members": None}
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            detail = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
            raise ValueError(
                f"{NOT_ARCHIVE}: not a zip or tar archive (plain, gz, bz2 or xz); the file starts with {head[:12]!r}"
                f" ({detail})"
            ) from None

    @rpc
    def next_member(self, limits: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Advance to the next member and describe it; ``None`` at the end.

        ``name`` and ``target`` are raw UTF-8 bytes exactly as the archive
        spells them; the broker, not this worker, decides whether they are safe.
        In a compressed tar, getting to the next header decompresses the data
        of the member before it, extracted or not: ``limits`` bound that too.
        """
        # (The first member was read when the archive was opened: next() returns it without a seek.)
        if self._tar is not None and limits is not None and self._tar.firstmember is None:
            try:
                Budget(Limits.from_wire(limits), self._size).check_skip(self._tar.offset)
            except Refused as exc:
                raise ValueError(str(exc)) from None
        try:
            if self._zip is not None:
                self._index += 1
                if self._index >= len(self._infos):
                    self._current = None
                    return None
                self._current = info = self._infos[self._index]
                return _describe_zip(self._zip, info)
            if self._tar is not None:
                if self._tar.firstmember is None and self._reader is not None:  # (else read at the open)
                    self._member_start = self._reader.count
                self._current = member = self._tar.next()
                return None if member is None else _describe_tar(member)
        except Exception as exc:
            raise ValueError(f"{CORRUPT}: the archive is damaged ({type(exc).__name__}: {exc})") from None
        raise ValueError("open_archive() was not called")

    @rpc
    def extract_member(self, out: str, total_so_far: int, limits: dict[str, Any]) -> dict[str, int]:
        """Stream the current member into ``self.broker.create(out)``.

        Raises ``ValueError("bomb: ...")`` as soon as the bytes produced pass a
        limit, ``ValueError("corrupt: ...")`` on bad data (CRC, truncation);
        either way the call fails and the broker discards the output.
        """
        if self._current is None or self._reader is None:
            raise ValueError("no current member")
        budget = Budget(Limits.from_wire(limits), self._size)
        budget.total_out = int(total_so_far)
        start = self._member_start if self._tar is not None else self._reader.count
        written = 0
        try:
            stream = self._zip.open(self._current) if self._zip is not None else self._tar.extractfile(self._current)
            if stream is None:
                raise ValueError(f"{CORRUPT}: the member has no data")
            # WRITE|SEEK|FSTAT: the output arrives as a real file (not a pipe to the broker), so the
            # worker's RLIMIT_FSIZE bounds it even if this code were compromised.
            with stream, self.broker.create(out, OUTPUT_RIGHTS) as dst:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    budget.check_member(written, self._reader.count - start)
                    dst.write(chunk)
        except Refused as exc:
            raise ValueError(str(exc)) from None
        except ValueError:
            raise
        except Exception as exc:  # BadZipFile (CRC), EOFError, zlib.error, lzma.LZMAError, tarfile.ReadError...
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a real I/O or permission error (NotCapable included): report as itself
            raise ValueError(f"{CORRUPT}: {type(exc).__name__}: {exc}") from None
        return {"bytes": written, "consumed": self._reader.count - start}


def _warm_up(tarfile: Any, zipfile: Any) -> None:
    """Write and read back a tiny archive in every format, so every codec is loaded before the sandbox."""
    for mode in ("w", "w:gz", "w:bz2", "w:xz"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tf:
            info = tarfile.TarInfo("a")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
        buf.seek(0)
        with tarfile.open(fileobj=buf, mode="r:*") as tf:
            for member in tf:
                extracted = tf.extractfile(member)
                if extracted is not None:
                    extracted.read()
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=method) as zf:
            zf.writestr("a", b"x" * 100)
        buf.seek(0)
        with zipfile.ZipFile(buf) as zf:
            zf.read("a")
    buf = io.BytesIO(b"PK\x05\x06" + b"\x00" * 18)
    zipfile.is_zipfile(buf)


def _tar_format(tf: Any) -> str:
    inner = getattr(tf, "fileobj", None)
    name = type(inner).__name__.lower()
    for key, label in (("gzip", "tar.gz"), ("bz2", "tar.bz2"), ("lzma", "tar.xz")):
        if key in name:
            return label
    return "tar"


def _describe_zip(zf: Any, info: Any) -> dict[str, Any]:
    name = info.orig_filename  # before zipfile cut it at a NUL or rewrote separators
    mode = (info.external_attr >> 16) & 0xFFFF if info.create_system == 3 else 0
    kind = "dir" if info.is_dir() else "file"
    target = b""
    if mode:
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFLNK:
            kind = "symlink"
            try:
                with zf.open(info) as fh:
                    target = fh.read(4096)
            except Exception:
                target = b""
        elif fmt == stat.S_IFCHR:
            kind = "char"
        elif fmt == stat.S_IFBLK:
            kind = "block"
        elif fmt == stat.S_IFIFO:
            kind = "fifo"
        elif fmt == stat.S_IFSOCK:
            kind = "socket"
        elif fmt == stat.S_IFDIR:
            kind = "dir"
    return {
        "name": name.encode("utf-8", "surrogateescape"),
        "type": kind,
        "size": int(info.file_size),
        "compressed": int(info.compress_size),
        "encrypted": bool(info.flag_bits & 0x1),
        "target": target,
    }


def _describe_tar(member: Any) -> dict[str, Any]:
    if member.isreg():
        kind = "file"
    elif member.isdir():
        kind = "dir"
    elif member.issym():
        kind = "symlink"
    elif member.islnk():
        kind = "hardlink"
    elif member.ischr():
        kind = "char"
    elif member.isblk():
        kind = "block"
    elif member.isfifo():
        kind = "fifo"
    else:
        kind = f"tar type {member.type!r}"
    return {
        "name": member.name.encode("utf-8", "surrogateescape"),
        "type": kind,
        "size": int(member.size),
        "compressed": None,
        "encrypted": False,
        "target": (member.linkname or "").encode("utf-8", "surrogateescape"),
    }


__all__ = ["BOMB", "CountingReader", "Unpacker"]
