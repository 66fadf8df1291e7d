"""The sandboxed half of the thumbnailer.

A :class:`Thumbnailer` runs in a privsep worker process. ``setup()`` runs
*before* the sandbox closes and loads everything Pillow will need; after
that the process can no longer open files, make network connections or
start programs. Each call gets one input as a read-only file (a grant with
``READ|FSTAT|SEEK``) and asks the broker for its one output file, which the
broker renames into place only if the call returns normally.
"""

from __future__ import annotations

import io
from typing import IO, Any

from protocol import Rights
from worker import Worker, rpc

from . import imaging

# Load Pillow and warm every codec when this module is imported. privsep's
# zygote imports the worker's module once and forks every worker from it, so
# they all start with Pillow loaded and warmed; setup() only sets the limits.
imaging.preload()
imaging.warm_up()


class Thumbnailer(Worker):
    """Decode one untrusted image, shrink it, encode it into a broker-created file."""

    #: setup() only sets Pillow's limits in this process: the zygote may make
    #: the worker (and enter its sandbox) before the pool asks for it.
    setup_ahead = True

    def setup(self) -> None:
        imaging.configure_pillow()

    @rpc
    def thumbnail(self, src: IO[bytes], size: int, fmt: str, quality: int, out: str) -> dict[str, Any]:
        """Convert ``src`` into ``out`` (a path the policy lets this worker create).

        Raises ``ValueError("<kind>: <detail>")`` (see :mod:`.imaging`) for a bad input;
        nothing is created then, since decoding finishes before the output is asked for.
        """
        try:
            img, facts = imaging.decode(src, size)
        except imaging.Rejected as exc:
            raise ValueError(str(exc)) from None  # a builtin crosses the wire as itself
        finally:
            src.close()  # the grant is no longer needed; drop it before asking for more
        # Encode in memory first: a thumbnail is small, and the output grant (WRITE only, no SEEK)
        # may be a pipe to the broker rather than a seekable file.
        buf = io.BytesIO()
        try:
            imaging.encode(img, buf, fmt, quality)
        except imaging.Rejected as exc:
            raise ValueError(str(exc)) from None
        data = buf.getbuffer()
        with self.broker.create(out, Rights.WRITE) as dst:
            dst.write(data)  # committed (renamed into place) by the broker only when this call returns
        written = len(data)
        return {"width": img.width, "height": img.height, "format": fmt, "bytes": written, **facts}
