"""Regenerate the thumbnailer's bundled sample images.

    python3 -m examples.thumbnailer.make_samples [OUTDIR]

Writes (by default into ``examples/thumbnailer/samples/``) a few real images,
one per input format, and the hostile ones. The output is committed; this
script documents exactly how every byte was made and lets you re-create it.
Images are drawn, not photographed, so everything is reproducible and small.

The FIFO cannot live in git; :func:`ensure_runtime_specials` creates it (and
re-creates the escaping symlink if a checkout dropped it). The CLI calls that
when it runs on the bundled samples.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import stat
import struct
import sys
from pathlib import Path
from typing import Any

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

#: The good images: file name -> (Pillow format, width, height, mode).
GOOD: dict[str, tuple[str, int, int, str]] = {
    "harbour.jpg": ("JPEG", 640, 480, "RGB"),
    "diagram.png": ("PNG", 400, 300, "RGBA"),
    "sticker.webp": ("WEBP", 320, 320, "RGBA"),
    "spinner.gif": ("GIF", 240, 180, "P"),
    "screenshot.bmp": ("BMP", 256, 192, "RGB"),
    "scan.tiff": ("TIFF", 300, 400, "L"),
    "elevation-16bit.png": ("PNG", 300, 200, "I;16"),
    "nested/cmyk-print.jpg": ("JPEG", 360, 240, "CMYK"),
}

#: The hostile inputs and the reason kind the thumbnailer must report for each.
#: (``imaging.REASON_KINDS`` plus ``not-capable``, which the broker raises.)
HOSTILE: dict[str, str] = {
    "truncated.jpg": "truncated",  # a real JPEG cut off at 40 %
    "not-really.png": "not-an-image",  # text with a .png name (wrong magic)
    "bomb.png": "decompression-bomb",  # a valid 45 KB PNG that inflates to 20000x20000 pixels
    "huge-header.bmp": "decompression-bomb",  # a 54-byte BMP header declaring 50000x50000, no pixel data
    "empty.jpg": "empty",  # zero bytes
    "passwd.jpg": "not-capable",  # symlink -> /etc/passwd, outside the input directory
    "fifo.jpg": "not-capable",  # a FIFO (made at run time; git cannot store one)
}
SYMLINK_NAME, SYMLINK_TARGET = "passwd.jpg", "/etc/passwd"
FIFO_NAME = "fifo.jpg"


def _scene(width: int, height: int, seed: int) -> Any:
    """A colourful RGB picture: gradient sky, sun, hills, some stripes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    px: Any = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = (
                int(40 + 120 * y / height + 30 * math.sin((x + seed) / 23)),
                int(90 + 100 * y / height),
                int(200 - 80 * y / height + 20 * math.cos((y + seed) / 17)),
            )
    draw = ImageDraw.Draw(img)
    r = min(width, height) // 8
    cx, cy = width * (0.25 + 0.1 * (seed % 5)), height * 0.3
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 210, 60))
    for i in range(3):
        top = height * (0.55 + 0.12 * i)
        draw.polygon(
            [(0, height), (0, top), (width * 0.3, top - 40 + 15 * i), (width * 0.7, top + 20), (width, top - 10),
             (width, height)],
            fill=(30 + 30 * i, 110 - 20 * i, 50 + 10 * i),
        )  # fmt: skip
    for i in range(0, width, 40):
        draw.line((i, height - 12, i + 20, height - 2), fill=(240, 240, 240), width=3)
    return img


def _good_image(name: str, fmt: str, width: int, height: int, mode: str, seed: int) -> bytes:
    from PIL import Image, ImageDraw

    base = _scene(width, height, seed)
    buf = io.BytesIO()
    if fmt == "GIF":
        frames = []
        for k in range(4):
            frame = base.copy()
            d = ImageDraw.Draw(frame)
            a = k * math.pi / 2
            d.line((width / 2, height / 2, width / 2 + 60 * math.cos(a), height / 2 + 60 * math.sin(a)),
                   fill=(255, 0, 0), width=6)  # fmt: skip
            frames.append(frame.quantize(64))
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
        return buf.getvalue()
    img: Any = base
    if mode == "RGBA":
        rgba = base.convert("RGBA")
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).rounded_rectangle((10, 10, width - 10, height - 10), radius=40, fill=255)
        rgba.putalpha(mask)
        img = rgba
    elif mode == "I;16":
        img = base.convert("L").convert("I").point(lambda v: v * 250).convert("I;16")  # 0..63750: really uses 16 bits
    elif mode != "RGB":
        img = base.convert(mode)
    options: dict[str, object] = {"format": fmt}
    if fmt == "JPEG":
        options["quality"] = 80
    elif fmt == "WEBP":
        options["quality"] = 75
    elif fmt == "TIFF":
        options["compression"] = "tiff_lzw"
    elif fmt == "PNG":
        options["optimize"] = True
    img.save(buf, **options)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid, fully decodable PNG: 20000x20000 1-bit black, about 45 KB (ratio ~1100:1)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000), 0).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def _huge_header_bmp() -> bytes:
    """A 54-byte BMP header declaring 50000x50000 at 24 bits (7.5 GB of pixels) with no pixel data."""
    width = height = 50000
    row = (width * 3 + 3) & ~3
    image_size = row * height
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, image_size & 0xFFFFFFFF, 2835, 2835, 0, 0)
    header = struct.pack("<2sIHHI", b"BM", (54 + image_size) & 0xFFFFFFFF, 0, 0, 54)
    return header + info


def generate(outdir: Path) -> list[Path]:
    """Write every committed sample into ``outdir``; return the paths written."""
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(name: str, data: bytes) -> None:
        path = outdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)

    for seed, (name, (fmt, w, h, mode)) in enumerate(GOOD.items()):
        put(name, _good_image(name, fmt, w, h, mode, seed))
    jpeg = (outdir / "harbour.jpg").read_bytes()
    put("truncated.jpg", jpeg[: len(jpeg) * 2 // 5])
    put("not-really.png", b"This is not a PNG. It is a text file wearing a .png name.\n")
    put("bomb.png", _bomb_png())
    put("huge-header.bmp", _huge_header_bmp())
    put("empty.jpg", b"")
    ensure_runtime_specials(outdir)
    written.append(outdir / SYMLINK_NAME)
    return written


def ensure_runtime_specials(sample_dir: Path) -> list[str]:
    """Create the escaping symlink and the FIFO in ``sample_dir`` if they are missing.

    Git stores the symlink but not the FIFO; some checkouts (zip downloads,
    ``core.symlinks=false``) drop the symlink as well. Returns notes on what
    was created; raises ``OSError`` if the directory is not writable.
    """
    notes = []
    link = sample_dir / SYMLINK_NAME
    if not link.is_symlink():
        if link.exists():
            link.unlink()  # a checkout without symlink support wrote the target path as a text file
        os.symlink(SYMLINK_TARGET, link)
        notes.append(f"created symlink {link.name} -> {SYMLINK_TARGET}")
    fifo = sample_dir / FIFO_NAME
    try:
        mode = fifo.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is None or not stat.S_ISFIFO(mode):
        if mode is not None:
            fifo.unlink()
        os.mkfifo(fifo, 0o644)
        notes.append(f"created FIFO {fifo.name}")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m examples.thumbnailer.make_samples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("outdir", nargs="?", type=Path, default=SAMPLES_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    paths = generate(args.outdir)
    total = sum(p.lstat().st_size for p in paths)
    for p in paths:
        print(f"{p.lstat().st_size:>9,}  {p.relative_to(args.outdir)}")
    print(f"{total:>9,}  total (plus the FIFO {FIFO_NAME}, made at run time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
