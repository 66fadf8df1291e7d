"""Which inherited pages a new worker has made its own once it is ready. Private.

A worker forked from the zygote shares the zygote's memory copy-on-write:
the first write to each shared page costs a fault (and a page copy), about
3-4 us each here in a process that has just woken. A worker whose
``setup()`` runs on request took about 300 of them between its request and
its ready answer (refcounts of the objects its start touches, pymalloc
pools, libpython's globals), on the spawn's critical path. The pages are
nearly the same for every worker of a class, since every spare is forked
from the same zygote: 296 of 324 were common to all of 20 workers in a row.

So the broker learns them once per (class, spec), from the first worker
handed out for it: once that worker is ready and asleep waiting for its
first call, the pages of its private writable mappings (those it had before
its request) that only it maps (pagemap bit 56, "exclusively mapped", since
Linux 4.2) are the ones it wrote since its fork, or that the zygote wrote
since (those it would then write without a copy). The zygote is kept idle
until then (the next spare is asked for after), so its own writes do not
add to the list. Later spares for that class are told these pages and
write them while they wait (``MADV_POPULATE_WRITE``, worker/_prefault.py),
off the critical path: pages they would have written anyway, before or
after their request.

Reading another process's pagemap needs ptrace read access (the same user
and a dumpable process, or CAP_SYS_PTRACE); where it is refused, nothing is
learned and spares touch nothing. This is a speed measure only: the pages
are the zygote's own, which holds no grants, and a spare changes no byte of
them. The lesson is read before the worker's first call, so no input it
parses can shape it, and it is bounded (``MAX_PAGES``, ``MAX_RANGES``):
at worst a spare writes 16 MiB of pages it did not need.
"""

from __future__ import annotations

import os
import re
import time

from worker._prefault import MAX_PAGES, MAX_RANGES  # what a spare request may name

PAGE = os.sysconf("SC_PAGE_SIZE")

_PRESENT_EXCLUSIVE = 0x81  # bits 63 and 56, in the top byte of a little-endian entry
_FLAG = bytes(1 if b & _PRESENT_EXCLUSIVE == _PRESENT_EXCLUSIVE else 0 for b in range(256))
_RUNS = re.compile(b"\x01+")
_SKIP = ("[stack", "[vvar", "[vdso", "[vsyscall", "[uprobes")


def writable(pid: int) -> list[tuple[int, int]]:
    """(first page, end page) of each private writable mapping of ``pid``
    but its stack. Raises OSError where its maps cannot be read."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        maps = f.read()
    out = []
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or fields[1] != b"rw-p":
            continue
        if len(fields) == 6 and fields[5].decode(errors="replace").startswith(_SKIP):
            continue
        lo, _, hi = fields[0].partition(b"-")
        out.append((int(lo, 16) // PAGE, int(hi, 16) // PAGE))
    return out


def asleep(pid: int, timeout: float = 0.05) -> None:
    """Wait (briefly) until ``pid`` sleeps: a worker that has sent its ready
    answer goes on to its first receive, writing more pages on the way.
    Raises OSError if it is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split(None, 1)[0] == b"S":
                return
        time.sleep(0.0002)


def owned(pid: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """(first page, count) runs of the pages within ``ranges`` that ``pid``
    alone maps; None if there are more than ``MAX_PAGES`` pages or
    ``MAX_RANGES`` runs (that is no start-up path). Raises OSError where its
    pagemap cannot be read."""
    runs: list[tuple[int, int]] = []
    total = 0
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for first, end in ranges:
            flags = os.pread(fd, (end - first) * 8, first * 8)[7::8].translate(_FLAG)
            for m in _RUNS.finditer(flags):
                runs.append((first + m.start(), m.end() - m.start()))
                total += m.end() - m.start()
                if total > MAX_PAGES or len(runs) > MAX_RANGES:
                    return None
    finally:
        os.close(fd)
    return runs
