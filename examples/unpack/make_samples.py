"""Regenerate the unpacker's bundled sample archives.

    python3 -m examples.unpack.make_samples [OUTDIR]

Two good archives and a set of hostile ones, all small (the bombs are about
20 KB each and inflate to 20 MiB). :data:`EXPECTED` says what the unpacker
must do with each; the tests read it.
"""

from __future__ import annotations

import argparse
import io
import random
import stat
import struct
import sys
import tarfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
MTIME = 1_700_000_000  # fixed, so the output is reproducible
BOMB_BYTES = 20 << 20

GOOD_TREE: dict[str, bytes] = {
    "docs/readme.txt": b"Extracted by privsep's sandboxed unpacker.\n",
    "docs/guide/intro.md": b"# Intro\n\nNothing in here can climb out of the output directory.\n",
    "data/numbers.csv": b"n,square\n" + b"".join(f"{i},{i * i}\n".encode() for i in range(200)),
    "hello.txt": b"hello, world\n",
}
GOOD_DIRS = ("empty-dir/",)

#: archive -> what the unpacker must do: files it extracts, (member, kind) it refuses, and the kind it stops on.
EXPECTED: dict[str, dict[str, Any]] = {
    "good.zip": {"files": sorted(GOOD_TREE), "refused": [], "stopped": None},
    "good.tar.gz": {"files": sorted(GOOD_TREE), "refused": [], "stopped": None},
    "zip-slip.zip": {
        "files": ["ok.txt"],
        "refused": [
            ("../evil.txt", "path-traversal"),
            ("docs/../../evil2.txt", "path-traversal"),
            ("..\\..\\evil3.txt", "path-traversal"),
        ],
        "stopped": None,
    },
    "absolute.tar": {
        "files": ["ok.txt"],
        "refused": [("/tmp/privsep-evil.txt", "absolute-name"), ("C:\\Windows\\evil.txt", "absolute-name")],
        "stopped": None,
    },
    "links.tar": {
        "files": ["ok.txt", "up/escaped.txt"],  # "up" never became a link, so this lands in OUTDIR/up/
        "refused": [("passwd", "symlink"), ("up", "symlink"), ("shadow", "hardlink"), ("sibling", "hardlink")],
        "stopped": None,
    },
    "links.zip": {"files": ["ok.txt"], "refused": [("passwd", "symlink")], "stopped": None},
    "devices.tar": {
        "files": ["ok.txt"],
        "refused": [("null", "device"), ("sda", "device"), ("pipe", "fifo")],
        "stopped": None,
    },
    "zip-bomb.zip": {"files": ["ok.txt"], "refused": [], "stopped": "bomb"},
    "tar-bomb.tar.gz": {"files": ["ok.txt"], "refused": [], "stopped": "bomb"},
    "lying-header.zip": {"files": ["ok.txt"], "refused": [("small.txt", "corrupt")], "stopped": None},
    "duplicates.zip": {
        "files": ["a.txt", "d"],
        "refused": [("a.txt", "duplicate"), ("d/x.txt", "conflict")],
        "stopped": None,
    },
    "not-an-archive.zip": {"files": [], "refused": [], "stopped": "not-an-archive"},
    "truncated.tar.gz": {"files": "some", "refused": "any", "stopped": "corrupt"},
}


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method, compresslevel=9) as zf:
        for info, data in members:
            if isinstance(info, str):
                info = zipfile.ZipInfo(info, date_time=time.gmtime(MTIME)[:6])
                info.compress_type = method
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.create_system = 3
            zf.writestr(info, data)
    return buf.getvalue()


def _tar(members: Sequence[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"compresslevel": 9} if mode == "w:gz" else {}
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT, **kwargs) as tf:  # type: ignore[call-overload]
        for info, data in members:
            info.mtime = MTIME
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    if mode == "w:gz":  # gzip stores the time; pin it
        raw = bytearray(buf.getvalue())
        raw[4:8] = struct.pack("<I", MTIME)
        return bytes(raw)
    return buf.getvalue()


def _ti(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _symlink_zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=time.gmtime(MTIME)[:6])
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _lying_zip() -> bytes:
    """``small.txt`` claims 100 bytes in both headers but its deflate stream carries 1 MiB."""
    data = _zip([("ok.txt", b"fine\n"), ("small.txt", b"A" * (1 << 20))])
    raw = bytearray(data)
    real = (1 << 20).to_bytes(4, "little")
    lie = (100).to_bytes(4, "little")
    # local header (PK\3\4): uncompressed size at offset 22; central header (PK\1\2): at offset 24
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = 0
        while (pos := raw.find(sig, pos)) >= 0:
            if raw[pos + off : pos + off + 4] == real:
                raw[pos + off : pos + off + 4] = lie
            pos += 4
    return bytes(raw)


def build() -> dict[str, bytes]:
    """Every sample archive, by file name."""
    out: dict[str, bytes] = {}
    tree = list(GOOD_TREE.items())
    out["good.zip"] = _zip([*tree, *[(d, b"") for d in GOOD_DIRS]])
    out["good.tar.gz"] = _tar(
        [(_ti(".", tarfile.DIRTYPE), None), (_ti("./docs", tarfile.DIRTYPE), None)]
        + [(_ti("./" + name), data) for name, data in tree]
        + [(_ti("./" + d.rstrip("/"), tarfile.DIRTYPE), None) for d in GOOD_DIRS],
        "w:gz",
    )
    out["zip-slip.zip"] = _zip(
        [
            ("ok.txt", b"fine\n"),
            ("../evil.txt", b"escaped!\n"),
            ("docs/../../evil2.txt", b"escaped!\n"),
            ("..\\..\\evil3.txt", b"escaped on Windows!\n"),
        ]
    )
    out["absolute.tar"] = _tar(
        [
            (_ti("ok.txt"), b"fine\n"),
            (_ti("/tmp/privsep-evil.txt"), b"escaped!\n"),
            (_ti("C:\\Windows\\evil.txt"), b"escaped on Windows!\n"),
        ]
    )
    out["links.tar"] = _tar(
        [
            (_ti("ok.txt"), b"fine\n"),
            (_ti("passwd", tarfile.SYMTYPE, linkname="/etc/passwd"), None),
            (_ti("up", tarfile.SYMTYPE, linkname="../.."), None),
            (_ti("up/escaped.txt"), b"would be two levels above OUTDIR if 'up' were a link\n"),
            (_ti("shadow", tarfile.LNKTYPE, linkname="/etc/shadow"), None),
            (_ti("sibling", tarfile.LNKTYPE, linkname="ok.txt"), None),
        ]
    )
    out["links.zip"] = _zip([("ok.txt", b"fine\n"), (_symlink_zipinfo("passwd"), b"/etc/passwd")])
    out["devices.tar"] = _tar(
        [
            (_ti("ok.txt"), b"fine\n"),
            (_ti("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
            (_ti("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
            (_ti("pipe", tarfile.FIFOTYPE), None),
        ]
    )
    zeros = bytes(BOMB_BYTES)
    out["zip-bomb.zip"] = _zip([("ok.txt", b"fine\n"), ("zeros.bin", zeros)])
    out["tar-bomb.tar.gz"] = _tar([(_ti("ok.txt"), b"fine\n"), (_ti("zeros.bin"), zeros)], "w:gz")
    out["lying-header.zip"] = _lying_zip()
    # zipfile warns about the duplicate name; that is the point
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["duplicates.zip"] = _zip(
            [
                ("a.txt", b"first\n"),
                ("a.txt", b"second: must not overwrite the first\n"),
                ("d", b"a file\n"),
                ("d/x.txt", b"needs d/ to be a directory\n"),
            ]
        )
    out["not-an-archive.zip"] = b"This is a text file with a .zip name.\n"
    rng = random.Random(4)
    noisy = [(_ti(f"part{i}.bin"), rng.randbytes(6000)) for i in range(4)]
    whole = _tar([(_ti("ok.txt"), b"fine\n"), *noisy], "w:gz")
    out["truncated.tar.gz"] = whole[: len(whole) // 2]
    return out


def generate(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in build().items():
        path = outdir / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m examples.unpack.make_samples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("outdir", nargs="?", type=Path, default=SAMPLES_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    paths = generate(args.outdir)
    for p in paths:
        print(f"{p.stat().st_size:>9,}  {p.name}")
    print(f"{sum(p.stat().st_size for p in paths):>9,}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
