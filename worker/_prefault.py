"""A spare writes, while it waits, the inherited pages its worker will write
as it starts (learned by the broker, see broker/_pagemap.py). Private.

``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14) breaks copy-on-write on a
range as a write would, without changing a byte: the copies are made now,
at the spare's background priority, instead of one fault at a time between
the spawn request and the ready answer.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable
from typing import Any

from .sandbox._libc import ffi, lib

# The address as an integer: the same register as a pointer in every ABI we
# run on, and no cdata object to make per call.
ffi.cdef("int madvise(uintptr_t addr, size_t length, int advice);")
_madvise = lib.madvise  # resolved here, in the zygote, not in each spare

MADV_POPULATE_WRITE = 23
#: the most a spare request may name (the broker keeps no longer list)
MAX_PAGES = 4096
MAX_RANGES = 1024
_CHECK_EVERY = 8  # runs between two looks for a request


def ranges_of(value: Any) -> list[tuple[int, int]] | None:
    """The (first page, count) runs of a spare request, or None if ``value``
    is not a list of at most ``MAX_RANGES`` such pairs of at most
    ``MAX_PAGES`` pages in all."""
    if type(value) is not list or len(value) > MAX_RANGES:
        return None
    out: list[tuple[int, int]] = []
    total = 0
    for item in value:
        if type(item) is not list or len(item) != 2:
            return None
        first, count = item
        if type(first) is not int or type(count) is not int or not (0 <= first < 1 << 52 and count > 0):
            return None
        total += count
        if total > MAX_PAGES:
            return None
        out.append((first, count))
    return out


def populate(runs: list[tuple[int, int]], wanted: Callable[[], bool]) -> int:
    """Write-fault each run of pages without changing them, until
    ``wanted()`` says the spare's request has come: the rest then faults
    as it is written, as it would have (a populated page costs about what
    a fault does). Returns how many pages were done. A run no longer mapped
    as it was (ENOMEM, EFAULT, EINVAL) is skipped; a kernel without
    MADV_POPULATE_WRITE (EINVAL on the first run) ends it."""
    page = mmap.PAGESIZE
    done = 0
    for i, (first, count) in enumerate(runs):
        if i % _CHECK_EVERY == 0 and i and wanted():
            break
        if int(_madvise(first * page, count * page, MADV_POPULATE_WRITE)) == 0:
            done += count
        elif i == 0 and ffi.errno == errno.EINVAL:
            break
    return done
