"""Which inherited pages a new worker writes as it starts. Private.

A worker forked from the zygote shares the zygote's memory copy-on-write:
the first write to each shared page costs a fault and a page copy (~2-3 us
here, with the cold caches of a process that has just woken). A worker
whose ``setup()`` runs on request takes about 300 of them between its
request and its ready answer (refcounts of the objects its start touches,
pymalloc pools, libpython's globals), on the spawn's critical path. The
pages are nearly the same for every worker of a class, since every spare is
forked from the same zygote: 296 of 324 were common to all of 20 workers in
a row here.

So the broker learns them once per (class, spec), from the pagemap of the
first worker handed out: ``snapshot()`` before its request and again once
it is ready, the zygote idle between the two (the next spare is asked for
after the second). A page that only this process maps (bit 56,
"exclusively mapped", since Linux 4.2) and did not before was written by it
in between. Later spares for that class are told these pages and write them
while they wait (``MADV_POPULATE_WRITE``, worker/_prefault.py), off the
critical path.

Reading another process's pagemap needs ptrace read access (the same user
and a dumpable process, or CAP_SYS_PTRACE); where it is refused, nothing is
learned and spares touch nothing. This is a speed measure only: the pages
are the zygote's own, which holds no grants, and a spare writes nothing of
anyone's into them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from worker._prefault import MAX_PAGES, MAX_RANGES  # what a spare request may name

PAGE = os.sysconf("SC_PAGE_SIZE")

_PRESENT_EXCLUSIVE = 0x81  # bits 63 and 56, in the top byte of a little-endian entry
_FLAG = bytes(1 if b & _PRESENT_EXCLUSIVE == _PRESENT_EXCLUSIVE else 0 for b in range(256))
_RUNS = re.compile(b"\x01+")
_SKIP = ("[stack", "[vvar", "[vdso", "[vsyscall", "[uprobes")

#: (first page, end page) of a private writable mapping -> one byte per page, 1 where
#: the page is present and mapped by this process alone
Snapshot = Mapping[tuple[int, int], bytes]


def snapshot(pid: int, within: Iterable[tuple[int, int]] | None = None) -> Snapshot:
    """Which pages of ``pid``'s private writable mappings it alone maps
    (``within``: these (first page, end page) ranges instead, as a previous
    snapshot's keys: reading the maps costs more than the pagemap). Raises
    OSError where its maps or pagemap cannot be read."""
    ranges = _writable(pid) if within is None else list(within)
    out: dict[tuple[int, int], bytes] = {}
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for first, end in ranges:
            data = os.pread(fd, (end - first) * 8, first * 8)
            out[(first, end)] = data[7::8].translate(_FLAG)
    finally:
        os.close(fd)
    return out


def _writable(pid: int) -> list[tuple[int, int]]:
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


def written_between(before: Snapshot, after: Snapshot) -> list[tuple[int, int]] | None:
    """(first page, count) runs that became exclusive between the snapshots,
    within mappings present in both; None if there are more than
    ``MAX_PAGES`` pages or ``MAX_RANGES`` runs."""
    runs: list[tuple[int, int]] = []
    total = 0
    for key, now in after.items():
        was = before.get(key)
        if was is None or len(was) != len(now):
            continue
        new = int.from_bytes(now, "little") & ~int.from_bytes(was, "little")
        if not new:
            continue
        for m in _RUNS.finditer(new.to_bytes(len(now), "little")):
            runs.append((key[0] + m.start(), m.end() - m.start()))
            total += m.end() - m.start()
            if total > MAX_PAGES or len(runs) > MAX_RANGES:
                return None
    return runs
