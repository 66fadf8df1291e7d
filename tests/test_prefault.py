"""Spares write ahead the inherited pages their worker will write as it
starts: the broker learns them once per (class, spec) from a worker's
pagemap (``broker._pagemap``), and later spares populate them while they
wait (``worker._prefault``). Measured with the kernel's own fault counts."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import signal
import struct
import time
from pathlib import Path

import pytest
from _prefault_workers import Flaky, Starter
from conftest import default_policy, open_fds, spare_of
from hypothesis import given
from hypothesis import strategies as st

from broker import Broker
from broker._pagemap import owned, writable
from protocol import WorkerCrashed
from worker import Worker
from worker._prefault import MAX_PAGES, MAX_RANGES, populate, ranges_of

PAGE = mmap.PAGESIZE


def _minflt(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def _settled(pid: int) -> int:
    """The spare's minor faults once it is asleep waiting for its request
    (done writing its pages ahead, at whatever priority it has)."""
    deadline = time.monotonic() + 10
    last = -1
    while True:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        now = _minflt(pid)
        if state == "S" and now == last:
            return now
        assert time.monotonic() < deadline, f"spare {pid} did not settle"
        last = now
        time.sleep(0.02)


def _faults_to_ready(b: Broker, cls: type[Worker]) -> tuple[int, object]:
    """Spawn ``cls`` from the waiting spare: the faults it took from its
    hand-out to its ready answer, and the handle."""
    spare = spare_of(b)
    assert spare is not None
    before = _settled(spare[0])
    w = b.spawn(cls)
    assert w.pid == spare[0]
    return _minflt(w.pid) - before, w


def _expect(b: Broker, cls: type[Worker]) -> tuple[str, str, object]:
    zygote = b._zygote
    assert zygote is not None and spare_of(b) is not None  # the pending answer read
    spare = zygote._spare
    assert spare is not None and spare.preload is not None and spare.preload[1] == cls.__qualname__
    return spare.preload


# -- through the broker --------------------------------------------------------
def test_later_spares_write_the_start_up_pages_ahead_and_take_far_fewer_faults(tree: Path) -> None:
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        zygote = b._zygote
        assert zygote is not None
        b.spawn(Starter).kill()  # its spare was forked before the class was known
        expect = _expect(b, Starter)
        assert zygote._touched(expect) is None
        learned_from, w = _faults_to_ready(b, Starter)  # the first spare preloaded for it: learned from
        runs = zygote._touched(expect)
        assert runs, "nothing learned from the first worker's pagemap"
        pages = sum(n for _, n in runs)
        assert 20 <= pages <= MAX_PAGES
        reference = w.sandbox
        w.kill()
        after: list[int] = []
        for _ in range(3):
            faults, w = _faults_to_ready(b, Starter)  # these spares populated the pages while waiting
            assert w.ping() == "pong"
            per_worker = ("entry_us", "real_uid")  # (a real uid is each worker's own)
            assert {k: v for k, v in w.sandbox.items() if k not in per_worker} == {
                k: v for k, v in reference.items() if k not in per_worker
            }
            after.append(faults)
            w.kill()
        assert max(after) < learned_from / 2, (learned_from, after, pages)
        assert zygote._touched(expect) == runs  # learned once per class and spec


def test_a_start_that_fails_while_being_learned_from_still_leaves_a_spare(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "fail"
    monkeypatch.setenv("PRIVSEP_TEST_FAIL_SETUP", str(marker))  # before the zygote starts
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        zygote = b._zygote
        assert zygote is not None
        b.spawn(Flaky).kill()
        expect = _expect(b, Flaky)
        marker.touch()
        with pytest.raises(WorkerCrashed, match="told to fail"):
            b.spawn(Flaky)  # the spare preloaded for it: would have been learned from
        assert zygote._learning is None and zygote._touched(expect) is None
        assert spare_of(b) is not None  # asked for although the spawn failed
        marker.unlink()
        w = b.spawn(Flaky)  # learned from now
        assert w.ping() == "pong"
        assert zygote._touched(expect)


def test_spawns_that_overlap_one_being_learned_from_let_the_lesson_go(tree: Path) -> None:
    """Another spawn while the zygote must stay idle: the lesson is dropped,
    every worker starts, and nothing is left behind."""

    async def main(b: Broker) -> list[str]:
        ws = await asyncio.gather(*(b.aspawn(Starter) for _ in range(4)))
        out = [w.ping() for w in ws]
        for w in ws:
            w.kill()
        return out

    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        zygote = b._zygote
        assert zygote is not None
        b.spawn(Starter).kill()
        before = open_fds(b)
        assert asyncio.run(main(b)) == ["pong"] * 4
        assert zygote._learning is None
        assert open_fds(b) == before and spare_of(b) is not None
        # one of the spares was preloaded for it: learned from, unless overlapped
        w = b.spawn(Starter)
        assert w.ping() == "pong"


def test_a_worker_gone_before_its_pages_are_read_teaches_nothing_and_spawns_go_on(tree: Path) -> None:
    """Its pagemap cannot be read (here: it died right after its handshake,
    so /proc has no entry): an empty lesson is kept (one try per class and
    spec), the next spare is asked for all the same, and is told nothing."""
    with Broker(default_policy(), root=tree, spawn="zygote") as b:
        zygote = b._zygote
        assert zygote is not None
        b.spawn(Starter).kill()
        expect = _expect(b, Starter)
        spare = zygote._spare
        assert spare is not None
        inherited = zygote._before_learning(spare, expect)
        assert inherited  # its writable mappings: what the lesson would be read within
        w = b.spawn(Starter)  # learned from (the zygote's own bookkeeping), replaced below
        w.kill()
        assert w.exit is not None and not os.path.exists(f"/proc/{w.pid}")
        zygote._learned.clear()
        with zygote._lock:
            zygote._collect(10.0)  # the spare asked for after that spawn: let it go
            if zygote._spare is not None:
                zygote._discard(zygote._spare)
                zygote._spare = None
        zygote._learning = (w.pid, expect, inherited)
        zygote.started(w.pid, True)
        assert zygote._learning is None and zygote._touched(expect) == []
        asked = spare_of(b)
        assert asked is not None and zygote._spare is not None and zygote._spare.preload == expect
        w = b.spawn(Starter)
        assert w.pid == asked[0] and w.ping() == "pong"
        assert zygote._touched(expect) == []  # not tried again


# -- the pieces, against the kernel ---------------------------------------------
def _addr(region: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def _exclusive(addr: int, count: int) -> list[bool]:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, 8 * count, 8 * (addr // PAGE))
    finally:
        os.close(fd)
    return [bool(v >> 63 & 1 and v >> 56 & 1) for (v,) in struct.iter_unpack("<Q", data)]


def _in_child(fn: object) -> None:
    """Run ``fn`` in a forked child; its AssertionError fails the test."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()  # type: ignore[operator]
            os.write(w, b"ok")
        except BaseException as exc:
            os.write(w, repr(exc).encode()[:4000])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert out == "ok", out


def test_populate_breaks_copy_on_write_without_changing_a_byte() -> None:
    region = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE)
    content = bytes(range(256)) * (8 * PAGE // 256)
    region[:] = content
    addr = _addr(region)
    first = addr // PAGE

    def child() -> None:
        assert _exclusive(addr, 8) == [False] * 8  # shared with the parent after fork
        done = populate([(first, 2), (first + 4, 3)], lambda: False)
        assert done == 5
        assert _exclusive(addr, 8) == [True, True, False, False, True, True, True, False]
        assert region[:] == content

    _in_child(child)


def test_populate_skips_what_is_not_mapped_and_stops_when_the_request_comes() -> None:
    region = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE)
    region[:] = b"x" * (4 * PAGE)
    first = _addr(region) // PAGE
    hole = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE)
    gone = _addr(hole) // PAGE
    hole.close()  # unmapped now

    def child() -> None:
        assert populate([(first, 1), (gone, 1), (first + 1, 1)], lambda: False) == 2
        runs = [(first + i % 4, 1) for i in range(40)]
        calls = []

        def wanted() -> bool:
            calls.append(1)
            return True

        assert populate(runs, wanted) == 8  # the first look comes after 8 runs
        assert len(calls) == 1

    _in_child(child)


def test_the_pages_a_child_owns_are_those_it_wrote_after_its_fork() -> None:
    region = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE)
    region[:] = b"y" * (16 * PAGE)
    first = _addr(region) // PAGE
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)
        os.write(w, b"1")
        os.read(go_r, 1)
        region[3 * PAGE] = 1
        region[4 * PAGE] = 1
        region[9 * PAGE] = 1
        os.write(w, b"2")
        os.read(go_r, 1)
        os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        os.read(r, 1)
        ranges = writable(pid)
        # (the kernel may have merged the mapping with a neighbour of the same kind)
        assert any(lo <= first and first + 16 <= hi for lo, hi in ranges), ranges
        assert owned(pid, [(first, first + 16)]) == []  # all shared with us
        os.write(go_w, b"g")
        os.read(r, 1)
        assert owned(pid, [(first, first + 16)]) == [(first + 3, 2), (first + 9, 1)]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in (r, go_w):
            os.close(fd)


def test_a_lesson_too_long_is_not_kept() -> None:
    region = mmap.mmap(-1, (2 * MAX_RANGES + 4) * PAGE, flags=mmap.MAP_PRIVATE)
    first = _addr(region) // PAGE
    for i in range(0, 2 * MAX_RANGES + 4, 2):
        region[i * PAGE] = 1  # every other page: one run each
    assert owned(os.getpid(), [(first, first + 2 * MAX_RANGES + 4)]) is None
    assert owned(os.getpid(), [(first, first + 6)]) == [(first, 1), (first + 2, 1), (first + 4, 1)]
    big = mmap.mmap(-1, (MAX_PAGES + 1) * PAGE, flags=mmap.MAP_PRIVATE)
    start = _addr(big) // PAGE
    big[:] = b"z" * ((MAX_PAGES + 1) * PAGE)
    assert owned(os.getpid(), [(start, start + MAX_PAGES + 1)]) is None
    assert owned(os.getpid(), [(start, start + MAX_PAGES)]) == [(start, MAX_PAGES)]


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=3),
                    lambda c: st.lists(c, max_size=4), max_leaves=12))
def test_a_spare_request_touches_only_well_formed_bounded_runs(value: object) -> None:
    runs = ranges_of(value)
    if runs is not None:
        assert isinstance(value, list) and len(runs) == len(value) <= MAX_RANGES
        assert sum(n for _, n in runs) <= MAX_PAGES
        assert all(type(a) is int and type(n) is int and a >= 0 and n > 0 for a, n in runs)


def test_a_spare_request_beyond_the_bounds_touches_nothing() -> None:
    assert ranges_of([[1, MAX_PAGES]]) == [(1, MAX_PAGES)]
    assert ranges_of([[1, MAX_PAGES], [5, 1]]) is None
    assert ranges_of([[i, 1] for i in range(MAX_RANGES + 1)]) is None
    assert ranges_of([[1, 0]]) is None and ranges_of([[-1, 1]]) is None and ranges_of([[True, 1]]) is None
    assert ranges_of([[1, 2, 3]]) is None and ranges_of((1, 2)) is None and ranges_of(None) is None
