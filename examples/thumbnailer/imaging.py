"""The image work itself: decode untrusted bytes, shrink, encode.

Pure Pillow, no privsep. The sandboxed worker (:mod:`.workers`) calls
:func:`make_thumbnail`; the benchmark calls the very same function without a
sandbox, so the comparison is of the isolation only.

Every refusal is a :class:`ValueError` whose message starts with a short
*kind* and a colon (``"decompression-bomb: ..."``); it crosses the privsep
wire as a real ``ValueError`` and :func:`split_reason` takes it apart again.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import IO, Any

#: Pillow format names we decode. Everything else Pillow could parse (PSD,
#: ICNS, EPS through Ghostscript, ...) is refused: less parser surface.
INPUT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: File-name suffixes the CLI treats as images (anything else is skipped).
INPUT_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
#: ``--format`` choice -> (Pillow format name, file suffix).
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "jpeg": ("JPEG", ".jpg"),
    "png": ("PNG", ".png"),
    "webp": ("WEBP", ".webp"),
}

#: Largest image we agree to decode, in pixels (width * height). 40 Mpx of
#: RGBA is 160 MB of pixel memory; real photos from phones are 12-50 Mpx.
MAX_PIXELS = 40_000_000
#: Largest input file we read at all.
MAX_INPUT_BYTES = 64 * 1024 * 1024
#: Longest side the ``size`` argument may ask for.
MAX_SIZE = 4096

# Reason kinds, shared by the worker (which raises) and the CLI (which reports).
EMPTY = "empty"
TOO_LARGE = "too-large"
NOT_AN_IMAGE = "not-an-image"
BOMB = "decompression-bomb"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
BAD_REQUEST = "bad-request"
REASON_KINDS = (EMPTY, TOO_LARGE, NOT_AN_IMAGE, BOMB, TRUNCATED, CORRUPT, BAD_REQUEST)


class Rejected(ValueError):
    """An input we refuse to convert. ``str()`` is ``"<kind>: <detail>"``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def split_reason(message: str) -> tuple[str, str]:
    """``"truncated: image file is truncated"`` -> ``("truncated", "image file is truncated")``.

    Messages that do not start with a known kind come back as ``("error", message)``.
    """
    kind, sep, detail = message.partition(": ")
    if sep and kind in REASON_KINDS:
        return kind, detail
    return "error", message


def preload() -> None:
    """Import Pillow and every plugin and codec module the worker will use (no settings changed).

    Called when :mod:`.workers` is imported: with privsep's zygote that happens
    once, in the zygote, so every worker forked from it starts with Pillow
    already loaded and its ``setup()`` is cheap. :func:`configure_pillow`
    imports the same again (a no-op then) for spawn methods without a zygote.
    """
    import importlib

    from PIL import Image

    for plugin in ("BmpImagePlugin", "GifImagePlugin", "JpegImagePlugin", "PngImagePlugin", "TiffImagePlugin",
                   "WebPImagePlugin", "TiffTags", "ExifTags", "ImageSequence", "ImagePalette", "ImageColor",
                   "ImageMath", "JpegPresets", "ImageFile", "ImageOps"):  # fmt: skip
        importlib.import_module(f"PIL.{plugin}")
    try:
        importlib.import_module("PIL.ImageCms")  # LAB and ICC conversions import it on first use
    except ImportError:
        pass  # Pillow built without LittleCMS: those conversions then fail cleanly as "corrupt"
    Image.init()  # registers (and imports) every plugin now, not on first open()


def configure_pillow(max_pixels: int = MAX_PIXELS) -> None:
    """Import every Pillow plugin we use and set the safety limits.

    Must run before the sandbox (in ``Worker.setup``): Pillow imports its
    format plugins lazily, and a sandboxed process can no longer open
    ``.py`` files. Afterwards a decode of anything over ``max_pixels`` raises
    instead of warning, and truncated files are errors, not grey pixels.
    """
    preload()
    from PIL import Image, ImageFile, ImageOps

    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; make that an error too.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    _ = ImageOps.exif_transpose  # ImageOps is imported above; keep the name used


def warm_up() -> None:
    """Round-trip a tiny image through every input and output format.

    Exercises the codecs once so that any lazy import or one-time
    initialisation (libjpeg, libwebp, libtiff, zlib) happens before the
    sandbox is entered, not on the first real request.
    """
    from PIL import Image

    img = Image.new("RGBA", (8, 6), (200, 100, 50, 128))
    for fmt in INPUT_FORMATS:
        buf = io.BytesIO()
        frame = img if fmt in ("PNG", "WEBP", "TIFF", "GIF") else img.convert("RGB")
        frame.save(buf, format=fmt)
        buf.seek(0)
        with Image.open(buf, formats=[fmt]) as back:
            back.load()
            _normalise_mode(back, "PNG")
            back.thumbnail((4, 4))
    for fmt, _suffix in OUTPUT_FORMATS.values():
        out = io.BytesIO()
        _normalise_mode(img, fmt).save(out, **_save_options(fmt, 80))
    # Every source mode through thumbnail() and every output's mode conversion.
    base = Image.linear_gradient("L").resize((16, 12))
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"):
        try:
            src = base.convert("RGB").convert(mode) if mode not in ("I;16",) else base.convert("I").convert(mode)
        except (ValueError, OSError):
            continue
        if src.mode.startswith("I;"):
            src = src.convert("I")
        src.thumbnail((8, 8))
        for fmt, _suffix in OUTPUT_FORMATS.values():
            _normalise_mode(src, fmt).save(io.BytesIO(), **_save_options(fmt, 80))


def _normalise_mode(img: Any, fmt: str) -> Any:
    """Convert ``img`` to a mode ``fmt`` can store, keeping transparency where the format can."""
    from PIL import Image

    keeps_alpha = fmt in ("PNG", "WEBP")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        if keeps_alpha:
            return rgba
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode in ("RGB", "L"):
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit greyscale: scale into 8 bits rather than clip.
        lo, hi = img.getextrema()
        if hi > lo:
            img = img.point(lambda v: (v - lo) * 255.0 / (hi - lo))
        return img.convert("L")
    return img.convert("RGB")  # P without transparency, CMYK, YCbCr, LAB, HSV, ...


def _save_options(fmt: str, quality: int) -> dict[str, Any]:
    if fmt == "JPEG":
        return {"format": "JPEG", "quality": quality, "optimize": False, "progressive": False}
    if fmt == "WEBP":
        return {"format": "WEBP", "quality": quality, "method": 4}
    return {"format": "PNG", "compress_level": 6}


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def magic_format(head: bytes) -> str | None:
    """The input format ``head`` (a file's first bytes) claims to be, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def sniff(head: bytes) -> str:
    """A short, printable description of a file's first bytes, for error messages."""
    shown = head[:12]
    return repr(shown) + ("..." if len(head) > 12 else "")


def decode(
    src: IO[bytes], size: int, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_INPUT_BYTES
) -> tuple[Any, dict[str, Any]]:
    """Decode ``src`` and shrink it to fit in ``size`` x ``size``.

    Returns the Pillow image and facts about the source (format, size, frames).

    Raises :class:`Rejected` with a clear kind for every bad input.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
        raise Rejected(BAD_REQUEST, f"size must be an integer from 1 to {MAX_SIZE}, not {size!r}")
    try:
        length = os.fstat(src.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):
        length = None
    if length == 0:
        raise Rejected(EMPTY, "the file is empty (0 bytes)")
    if length is not None and length > max_bytes:
        raise Rejected(TOO_LARGE, f"the file is {length:,} bytes, over the {max_bytes:,}-byte limit")
    # Read the whole input into memory (it is at most max_bytes) and let Pillow parse that: the
    # decoders then never see a file descriptor, so none of them (libtiff, for one) tries to
    # mmap() or seek the grant, and a pipe works as well as a file.
    data = src.read(max_bytes + 1)
    if not data:
        raise Rejected(EMPTY, "the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise Rejected(TOO_LARGE, f"the file is over the {max_bytes:,}-byte limit")
    head = data[:16]
    src = io.BytesIO(data)

    img: Any
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src, formats=list(INPUT_FORMATS))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise Rejected(CORRUPT, f"the header declares an empty {width}x{height} image")
            if width * height > max_pixels:
                raise Rejected(
                    BOMB,
                    f"the header declares {width}x{height} = {width * height / 1e6:,.0f} Mpx, "
                    f"over the {max_pixels / 1e6:,.0f} Mpx limit; refused before decoding",
                )
            facts = {"source_format": img.format, "source_size": [width, height],
                     "animated": bool(getattr(img, "is_animated", False))}  # fmt: skip
            # Multi-frame GIF/TIFF/WebP: open() leaves us on the first frame, which is what we convert.
            if img.mode.startswith("I;"):  # 16-bit greyscale (PNG/TIFF): resize needs the 32-bit "I" mode
                img = img.convert("I")
            # draft() lets JPEG decode straight at a reduced scale; thumbnail() then finishes.
            img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
            img.load()
            try:
                img = ImageOps.exif_transpose(img)  # honour the camera's orientation tag
            except Exception:
                pass  # a broken EXIF block is no reason to refuse good pixels

    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check (at open, from the header): "Image size (N pixels) exceeds limit of M pixels ..."
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)) / 1e6:,.0f} Mpx" if found else "more pixels than allowed"
        raise Rejected(
            BOMB, f"the header declares {declared}, over the {max_pixels / 1e6:,.0f} Mpx limit; refused before decoding"
        ) from None
    except UnidentifiedImageError:
        looks_like = magic_format(head)
        if looks_like:
            raise Rejected(CORRUPT, f"starts like a {looks_like} file, but its header is broken") from None
        names = "/".join("WebP" if f == "WEBP" else f for f in INPUT_FORMATS)
        raise Rejected(NOT_AN_IMAGE, f"not a {names} image (the file starts with {sniff(head)})") from None
    except MemoryError:
        raise Rejected(TOO_LARGE, "decoding ran out of memory (the worker's memory limit)") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "premature end" in text.lower() or isinstance(exc, EOFError):
            raise Rejected(TRUNCATED, f"the image data ends early ({text})") from None
        raise Rejected(CORRUPT, f"{type(exc).__name__}: {text}") from None
    except Exception as exc:  # Pillow raises SyntaxError, struct.error, EOFError, IndexError ... on bad data
        text = str(exc)
        if isinstance(exc, EOFError) or "not enough image data" in text:
            raise Rejected(TRUNCATED, f"the image data ends early ({text})") from None
        if "too large" in text.lower() or "too much memory" in text.lower():  # PNG text/ICC chunk bombs
            raise Rejected(BOMB, f"a compressed chunk expands past Pillow's limit ({text})") from None
        raise Rejected(CORRUPT, f"{type(exc).__name__}: {text}") from None
    return img, facts


def encode(img: Any, dst: IO[bytes], fmt: str, quality: int) -> None:
    """Encode ``img`` into ``dst`` as ``fmt`` (a key of :data:`OUTPUT_FORMATS`)."""
    if fmt not in OUTPUT_FORMATS:
        raise Rejected(BAD_REQUEST, f"unknown output format {fmt!r}")
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise Rejected(BAD_REQUEST, f"quality must be an integer from 1 to 100, not {quality!r}")
    pil_fmt = OUTPUT_FORMATS[fmt][0]
    _normalise_mode(img, pil_fmt).save(dst, **_save_options(pil_fmt, quality))


def make_thumbnail(src: IO[bytes], dst: IO[bytes], size: int, fmt: str, quality: int) -> dict[str, Any]:
    """Decode ``src``, shrink to fit ``size``, encode as ``fmt`` into ``dst``; no sandbox involved."""
    img, facts = decode(src, size)
    encode(img, dst, fmt, quality)
    return {"width": img.width, "height": img.height, "format": fmt, **facts}
